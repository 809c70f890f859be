"""Training data for every stage: ``DataConfig`` -> dataset (holst.data) -> scanned samples -> batches.

- :func:`open_samples`: builds the dataset of a :class:`holst.config.DataConfig` (or takes a given
  one) and scans it: every image is decoded once, bad ones (empty, not an image, truncated,
  corrupt, too large, no caption ...) are dropped and counted by reason in one
  :class:`holst.data.DataReport`, the same for every stage.
- :class:`SampleBatches`: deterministic, resumable, rank-sharded micro-batches of samples. The
  order is a permutation seeded by (seed, epoch); process ``r`` of ``W`` takes slice ``r`` of each
  global batch, so a resumed run, or a run on another number of processes with the same global
  batch, sees the same samples.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from holst.config import ConfigError
from holst.data.config import DataConfig
from holst.data.images import DataReport
from holst.utils.runtime import get_logger

log = get_logger("holst.train")

_MASK64 = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample seed independent of batch layout and process count."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index * 7_919 + 12_345) & _MASK64


def open_samples(data: DataConfig | Any, *, cache_bytes: int | None = None) -> tuple[Any, DataReport]:
    """A map-style dataset of good samples and the report of what was skipped.

    Args:
        data: a DataConfig (built with :func:`holst.data.build_dataset`), or a dataset: a holst.data
            loader, a ConcatDataset of them, any map-style dataset (a list of dicts, code shards),
            or an iterable one (read into memory once).
        cache_bytes: decoded images kept in memory (default 1 GiB; 0 = decode on every access).
    Returns:
        (dataset, report); raises ConfigError when no sample is left.
    """
    from holst.data.loaders import DEFAULT_CACHE_BYTES, ImageCaptionDataset, build_dataset

    cache = DEFAULT_CACHE_BYTES if cache_bytes is None else cache_bytes
    try:
        dataset = build_dataset(data) if isinstance(data, DataConfig) else data
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"training data: {e}") from e
    parts = dataset.datasets if isinstance(dataset, torch.utils.data.ConcatDataset) else [dataset]
    report = DataReport()
    for part in parts:
        if isinstance(part, ImageCaptionDataset):
            report.merge(part.scan(cache_bytes=cache))
    if isinstance(dataset, torch.utils.data.ConcatDataset):
        dataset = torch.utils.data.ConcatDataset(parts)  # lengths changed by the scans
    elif not isinstance(dataset, ImageCaptionDataset):
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            log.info("dataset is iterable only: reading it into memory once")
            dataset = list(dataset)
            report.merge(getattr(parts[0], "report", DataReport()))
        if not report.read:
            report.read = report.kept = len(dataset)
    if len(dataset) == 0:
        raise ConfigError(f"training data: no usable sample ({report.summary()})")
    return dataset, report


class SampleBatches:
    """Deterministic, resumable, rank-sharded micro-batches of dataset items.

    Args:
        dataset: map-style (``__len__`` / ``__getitem__``).
        batch_size: micro-batch of this process.
        seed: data seed.
        rank, world_size: this process's slice of every global batch of ``batch_size * world_size``.
        num_workers: DataLoader worker processes that read items ahead (0 = in this process).
    """

    def __init__(self, dataset: Any, *, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0) -> None:
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.global_batch = batch_size * world_size
        self.num_samples = len(dataset)
        if self.num_samples < self.global_batch:
            raise ConfigError(f"the dataset has {self.num_samples} samples, fewer than one global batch "
                              f"(batch_size {batch_size} x {world_size} processes)")
        self.batches_per_epoch = self.num_samples // self.global_batch  # the last partial batch is dropped
        self.epoch = 0
        self.batch_index = 0
        self.num_workers = num_workers
        self._perm: torch.Tensor | None = None
        self._perm_epoch = -1
        self._loader: Iterator[list[Any]] | None = None

    def state_dict(self) -> dict[str, int]:
        """The data position (epoch, batch index) and the sizes it depends on, for a checkpoint."""
        return {"epoch": self.epoch, "batch_index": self.batch_index, "num_samples": self.num_samples,
                "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at :meth:`state_dict`'s position (a warning when the dataset or global batch changed)."""
        if state.get("num_samples") != self.num_samples:
            log.warning("the dataset changed size since the checkpoint (%s -> %d samples): data order differs",
                        state.get("num_samples"), self.num_samples)
        if state.get("global_batch") != self.global_batch:
            log.warning("the global batch changed since the checkpoint (%s -> %d): data order differs",
                        state.get("global_batch"), self.global_batch)
        self.epoch = int(state["epoch"])
        self.batch_index = int(state["batch_index"])
        self._loader = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, -1))
            self._perm = torch.randperm(self.num_samples, generator=g)
            self._perm_epoch = epoch
        return self._perm

    def _indices(self, epoch: int, batch_index: int) -> list[int]:
        start = batch_index * self.global_batch + self.rank * self.batch_size
        return self._permutation(epoch)[start: start + self.batch_size].tolist()

    def _index_stream(self) -> Iterator[list[int]]:
        epoch, b = self.epoch, self.batch_index
        while True:
            if b >= self.batches_per_epoch:
                epoch, b = epoch + 1, 0
            yield self._indices(epoch, b)
            b += 1

    def next_items(self) -> tuple[list[int], list[Any]]:
        """This process's next micro-batch: (dataset indices, items)."""
        if self.batch_index >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_index = 0
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        indices = self._indices(self.epoch, self.batch_index)
        self.batch_index += 1
        if self.num_workers > 0:
            if self._loader is None:  # workers read ahead from the position they were started at
                self._loader = iter(torch.utils.data.DataLoader(
                    self.dataset, batch_sampler=self._index_stream_from(indices), num_workers=self.num_workers,
                    collate_fn=list))
            return indices, next(self._loader)
        return indices, [self.dataset[i] for i in indices]

    def _index_stream_from(self, first: list[int]) -> Any:
        stream = self._index_stream()  # starts after ``first`` (batch_index was advanced)

        class _Sampler:
            def __iter__(self_inner) -> Iterator[list[int]]:
                yield first
                yield from stream
        return _Sampler()


def stack_images(items: list[Any]) -> torch.Tensor:
    """Items ``{"image": (3, H, W)}`` (or bare tensors) -> (B, 3, H, W) float in [0, 1]."""
    images = [item["image"] if isinstance(item, dict) else item for item in items]
    for image in images:
        if not torch.is_tensor(image) or image.dim() != 3 or image.shape[0] != 3:
            raise ConfigError(f"dataset items must be (3, H, W) tensors or {{'image': (3, H, W)}}; "
                              f"got {type(image).__name__} {tuple(getattr(image, 'shape', ()))}")
    return torch.stack(images).float()
