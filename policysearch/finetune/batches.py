"""Seeded training batches over a data bundle's training split (never an evaluation image)."""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = ["TrainBatches"]


class TrainBatches:
    """One epoch of shuffled ``(images, labels)`` batches per iteration, from one seeded CPU
    generator (``generator``: the trainer checkpoints and restores it, so a resumed run draws the
    same batches). In-memory datasets (``images``/``labels``/``preprocess``, e.g. Fashion-MNIST)
    are gathered and preprocessed a batch at a time; other datasets item by item. The last batch
    of an epoch may be smaller (``drop_last=False``)."""

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int = 0, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.generator = torch.Generator().manual_seed(seed)
        self._arrays = all(hasattr(dataset, a) for a in ("images", "labels", "preprocess"))

    def __len__(self) -> int:
        n = len(self.dataset)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.dataset)  # type: ignore[arg-type]
        perm = torch.randperm(n, generator=self.generator)
        for i in range(len(self)):
            idx = perm[i * self.batch_size:(i + 1) * self.batch_size]
            yield self._gather(idx)

    def _gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ds: Any = self.dataset
        if self._arrays:
            return ds.preprocess(ds.images[idx]), ds.labels[idx]
        items = [ds[int(i)] for i in idx]
        return torch.stack([x for x, _ in items]), torch.as_tensor([y for _, y in items], dtype=torch.int64)
