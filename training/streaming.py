"""Training rows that live on disk: preprocessed float32 rows in a raw file, read a window
of blocks at a time in a shuffled order, so that memory does not grow with the data."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

# Rows are read in blocks of about this many bytes, and shuffled within windows of
# WINDOW_BLOCKS blocks (64 MiB): what a minibatch can mix, and what is held at a time.
BLOCK_BYTES = 1 << 20
WINDOW_BLOCKS = 64


class SpilledRows:
    """``n_rows`` preprocessed samples of shape ``sample_shape``, stored as C-ordered float32
    in the raw file ``path`` (as ``ndarray.tofile`` writes them).

    An epoch (:meth:`minibatches`) draws a random order of blocks and, for each window of
    ``WINDOW_BLOCKS`` blocks, a random order of its rows; every row is visited once. When all
    rows fit in one window the order is ``torch.randperm(n_rows)``, the order an in-memory
    fit with the same generator takes, so that a small streamed fit equals an in-memory one.
    """

    def __init__(self, path: str | Path, n_rows: int, sample_shape: tuple[int, ...]):
        self.path = Path(path)
        self.sample_shape = tuple(sample_shape)
        self.row_values = math.prod(self.sample_shape)
        expected = n_rows * self.row_values * 4
        if self.path.stat().st_size != expected:
            raise ValueError(f"{self.path} holds {self.path.stat().st_size} bytes, not the "
                             f"{expected} of {n_rows} float32 rows of shape {sample_shape}")
        self.n_rows = n_rows
        self.block_rows = max(1, BLOCK_BYTES // (4 * self.row_values))
        self.window_rows = WINDOW_BLOCKS * self.block_rows
        self.device = torch.device("cpu")

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n_rows, *self.sample_shape)

    def _read(self, file, start: int, stop: int) -> np.ndarray:
        file.seek(start * self.row_values * 4)
        rows = np.fromfile(file, dtype=np.float32, count=(stop - start) * self.row_values)
        return rows.reshape(stop - start, *self.sample_shape)

    def read_all(self) -> torch.Tensor:
        with open(self.path, "rb") as file:
            return torch.from_numpy(self._read(file, 0, self.n_rows))

    def minibatches(self, batch_rows: int, generator: torch.Generator | None
                    ) -> Iterator[torch.Tensor]:
        """One epoch's minibatches of at most ``batch_rows`` rows, ``(m, *sample_shape)``."""
        if self.n_rows <= self.window_rows:
            rows = self.read_all()
            order = torch.randperm(self.n_rows, generator=generator)
            for start in range(0, self.n_rows, batch_rows):
                yield rows[order[start:start + batch_rows]]
            return
        n_blocks = math.ceil(self.n_rows / self.block_rows)
        blocks = torch.randperm(n_blocks, generator=generator).tolist()
        with open(self.path, "rb") as file:
            for first in range(0, n_blocks, WINDOW_BLOCKS):
                window = torch.from_numpy(np.concatenate([
                    self._read(file, b * self.block_rows,
                               min(self.n_rows, (b + 1) * self.block_rows))
                    for b in sorted(blocks[first:first + WINDOW_BLOCKS])]))
                order = torch.randperm(len(window), generator=generator)
                for start in range(0, len(window), batch_rows):
                    yield window[order[start:start + batch_rows]]
