"""ClipRanker (holst.rerank.ranker): captions in, scores out; the one owner of CLIP's keep_eos encoding."""

from __future__ import annotations

import warnings

import pytest
import torch

from holst.config import ConfigError
from holst.rerank import ClipRanker, clip_text_ids
from holst.rerank.clip import CLIPModel, clip_preset
from holst.text import BPETokenizer

CAPTIONS = ["красный круг", "синий квадрат на белом фоне", "зелёная звезда", "жёлтое солнце"]


@pytest.fixture(scope="module")
def ranker() -> ClipRanker:
    corpus = [f"{a} {b} {c}" for a in ("красный", "синий", "зелёный", "жёлтый") for b in ("круг", "квадрат", "звезда")
              for c in ("на белом фоне", "слева", "солнце")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = BPETokenizer.train(corpus, vocab_size=120)
    torch.manual_seed(0)
    model = CLIPModel(clip_preset("tiny", vocab_size=max(300, tok.vocab_size))).eval()
    return ClipRanker(model, tok)


def _images(n: int, size: int = 20) -> torch.Tensor:
    return torch.rand(n, 3, size, size + 4, generator=torch.Generator().manual_seed(n))  # any size, any aspect


def test_score_is_clip_score_of_keep_eos_ids(ranker):
    images = _images(4)
    ids = ranker.tokenizer.encode_batch(CAPTIONS, ranker.config.context_length, keep_eos=True)
    expected = ranker.model.score(images, ids)
    got = ranker.score(images, CAPTIONS)
    assert got.shape == (4,) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected)
    one = ranker.score(images, CAPTIONS[:1])  # one caption against every image
    torch.testing.assert_close(one, ranker.model.score(images, ids[:1]))


def test_similarity_matrix_diagonal_is_the_pair_score(ranker):
    images = _images(3)
    sim = ranker.similarity(images, CAPTIONS)
    assert sim.shape == (3, 4)
    torch.testing.assert_close(sim.diagonal(), ranker.score(images, CAPTIONS[:3]), rtol=1e-4, atol=1e-4)
    emb = ranker.text_embeddings(CAPTIONS, batch_size=3)
    assert emb.shape == (4, ranker.config.embed_dim)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))


def test_long_caption_keeps_its_eos(ranker):
    long = " ".join(["синий квадрат на белом фоне"] * 20)
    ids = ranker.encode_texts([long])
    assert ids.shape == (1, ranker.config.context_length)
    assert int(ids[0, -1]) == ranker.tokenizer.eos_id  # ruCLIP's convention: the eos survives the cut
    trimmed = clip_text_ids(ranker.tokenizer, ["круг", long], ranker.config.context_length, trim=True)
    assert trimmed.shape[1] == ranker.config.context_length
    short = clip_text_ids(ranker.tokenizer, ["круг"], ranker.config.context_length, trim=True)
    assert short.shape[1] < ranker.config.context_length  # trailing pad columns cut ...
    full = ranker.encode_texts(["круг"])
    torch.testing.assert_close(ranker.model.encode_text(short), ranker.model.encode_text(full))  # ... exactly


def test_score_rejects_mismatched_counts_and_foreign_tokenizers(ranker):
    with pytest.raises(ValueError, match="2 images but 4 captions"):
        ranker.score(_images(2), CAPTIONS)
    with pytest.raises(TypeError, match="sequence of captions"):
        ranker.score(_images(1), "круг")
    small = CLIPModel(clip_preset("tiny", vocab_size=50))
    with pytest.raises(ConfigError, match="exceeds the CLIP model's vocab_size=50"):
        ClipRanker(small, ranker.tokenizer)


def test_from_pretrained_round_trip(ranker, tmp_path):
    ranker.save_pretrained(tmp_path / "clip")
    assert (tmp_path / "clip" / "tokenizer" / "bpe.model").is_file()
    loaded = ClipRanker.from_pretrained(tmp_path / "clip")
    images = _images(2)
    torch.testing.assert_close(loaded.score(images, CAPTIONS[:2]), ranker.score(images, CAPTIONS[:2]))
    (tmp_path / "bare").mkdir()
    ranker.model.save_pretrained(tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match="CLIP tokenizer not found"):
        ClipRanker.from_pretrained(tmp_path / "bare")
    other = ClipRanker.from_pretrained(tmp_path / "bare", tokenizer=tmp_path / "clip" / "tokenizer" / "bpe.model")
    torch.testing.assert_close(other.score(images, CAPTIONS[:2]), ranker.score(images, CAPTIONS[:2]))
