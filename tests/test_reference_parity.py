"""Parity with the real reference code: holst's DalleModel vs ruDALL-E 1.1.3's DalleModel (PyPI wheel).

Both get the same random weights in the official layout (tests/test_dalle.py's ``official_state_dict``); the
reference builds its own row / column / conv masks from its own code, so masks, the v2 BOS shift, pad ids,
sandwich LN, PB-relax and the loss slices are all checked against the original, not against a re-statement.

The wheel installs with ``pip install --no-deps rudalle==1.1.3`` (``./setup.sh --dev`` does it); its package
``__init__`` imports heavy dependencies (huggingface_hub, transformers, the VAE), so the transformer modules
are imported from its ``rudalle/dalle`` folder directly (they need only torch and einops). Skips only when the
wheel is absent.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from holst.config import DalleConfig
from holst.convert.rudalle import load_rudalle_transformer

sys.path.insert(0, str(Path(__file__).parent))
from test_dalle import official_state_dict  # noqa: E402  (the official key names and shapes)

MASK_KEYS = ("transformer.row_mask", "transformer.col_mask", "transformer.conv_mask")


def reference_dalle_class() -> type:
    """``rudalle.dalle.model.DalleModel`` of the installed wheel, imported without ``rudalle/__init__``."""
    spec = importlib.util.find_spec("rudalle")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the rudalle 1.1.3 wheel is not installed (./setup.sh --dev installs it with --no-deps)")
    assert importlib.metadata.version("rudalle") == "1.1.3"
    name = "_rudalle_reference_dalle"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [str(Path(spec.submodule_search_locations[0]) / "dalle")]
        sys.modules[name] = package
    return importlib.import_module(f"{name}.model").DalleModel


def parity_config(version: str) -> DalleConfig:
    """Small, but every mask matters: 12x12 codes (the 11x11 conv window really cuts; v2 wraps), 4 layers =
    row, col, row, conv (reference.md §1.5)."""
    return DalleConfig(num_layers=4, hidden_size=32, num_attention_heads=4, text_seq_length=8,
                       image_tokens_per_dim=12, vocab_size=40 + 8, image_vocab_size=24, hf_version=version,
                       embedding_dropout_prob=0.0, attention_dropout_prob=0.0, output_dropout_prob=0.0)


def reference_params(c: DalleConfig) -> dict:
    """The reference's ``model_params`` for config ``c`` (the official configs' flags: sandwich LN, PB-relax)."""
    return dict(num_layers=c.num_layers, vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                num_attention_heads=c.num_attention_heads, embedding_dropout_prob=0.0, attention_dropout_prob=0.0,
                output_dropout_prob=0.0, text_seq_length=c.text_seq_length,
                image_tokens_per_dim=c.image_tokens_per_dim, image_vocab_size=c.image_vocab_size,
                cogview_sandwich_layernorm=True, cogview_pb_relax=True, hf_version=c.hf_version)


@pytest.fixture(scope="module", params=["v2", "v3"])
def models(request, tmp_path_factory):
    version = request.param
    c = parity_config(version)
    sd = official_state_dict(c, seed=7)
    path = tmp_path_factory.mktemp(f"official_{version}") / "pytorch_model.bin"
    torch.save(sd, path)
    ours = load_rudalle_transformer(path, **reference_params(c))
    ref = reference_dalle_class()(device="cpu", **reference_params(c))
    # as the reference's loader: every weight, the masks it computed itself (the file's are ignored)
    missing, unexpected = ref.load_state_dict({k: v for k, v in sd.items() if k not in MASK_KEYS}, strict=False)
    assert sorted(missing) == sorted(MASK_KEYS) and not unexpected
    return c, ours.eval(), ref.eval()


def make_ids(c: DalleConfig, B: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(4, c.vocab_size - c.text_seq_length, (B, c.text_seq_length), generator=g)
    text[:, 0] = 2
    text[0, 4] = 3
    text[0, 5:] = 0  # a short caption: eos, then pads (which become position-specific ids)
    return torch.cat([text, torch.randint(0, c.image_vocab_size, (B, n), generator=g)], dim=1)


def reference_logits(ref, c: DalleConfig, ids: torch.Tensor) -> torch.Tensor:
    S = c.text_seq_length + c.image_seq_length
    mask = torch.tril(torch.ones(ids.shape[0], 1, S, S))
    return ref(ids, mask)[0]


@pytest.mark.parametrize("n", [0, 40, 144], ids=["text", "part", "full"])
def test_logits_match_the_reference_dalle_model(models, n):
    c, ours, ref = models
    ids = make_ids(c, 3, n)
    with torch.no_grad():
        got, want = ours(ids), reference_logits(ref, c, ids)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_loss_matches_the_reference_dalle_model(models):
    """The reference's return_loss=True (text slice, v2/v3 image slice, weight 7) on a full image (its v2 slices
    need one), through both holst loss paths; v3 with ``v3_reference_loss`` (README: by default holst scores
    image[0] in the image vocabulary, so there the numbers differ on purpose)."""
    import dataclasses

    from holst.dalle import DalleModel

    c, ours, ref = models
    ids = make_ids(c, 2, c.image_seq_length, seed=1)
    S = c.text_seq_length + c.image_seq_length
    with torch.no_grad():
        want, parts = ref(ids, torch.tril(torch.ones(2, 1, S, S)), return_loss=True)
        if c.hf_version == "v3":
            assert not torch.allclose(ours.compute_loss(ids)[0], want, atol=1e-4)  # the documented difference
            model = DalleModel(dataclasses.replace(ours.config, v3_reference_loss=True)).eval()
            model.load_state_dict(ours.state_dict())
        else:
            model = ours
        for got, got_parts in (model.compute_loss(ids, model(ids)), model.compute_loss(ids)):  # full / lean logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_parts["text"], parts["text"], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_parts["image"], parts["image"], atol=1e-5, rtol=1e-5)


def test_greedy_continuation_matches_the_reference(models):
    """Greedy decoding through holst's KV cache = argmax of the reference's full forward at every step."""
    from holst.sampling import sample_image_codes

    c, ours, ref = models
    text = make_ids(c, 2, 0, seed=2)
    codes = sample_image_codes(ours, text, top_k=1, top_p=1.0, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (2, c.image_seq_length)
    with torch.no_grad():
        logits = reference_logits(ref, c, torch.cat([text, codes], 1))
    P = c.text_seq_length + (1 if c.hf_version == "v2" else 0)  # the position whose logits give image token 0
    want = logits[:, P - 1 : P - 1 + c.image_seq_length, c.vocab_size :].argmax(-1)
    assert torch.equal(codes, want)
