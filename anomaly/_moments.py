"""Column statistics gathered over batches of rows in one pass (Chan et al.'s pairwise update
of means and sums of squared deviations), for fitting on data read from disk."""

from __future__ import annotations

import numpy as np


class ColumnMoments:
    """Row count, mean, population standard deviation, minimum and maximum of each column
    over every batch given to :meth:`update`: equal, up to float64 rounding, to
    ``X.mean(axis=0)``, ``X.std(axis=0)``, ``X.min(axis=0)`` and ``X.max(axis=0)`` of the
    batches stacked."""

    def __init__(self) -> None:
        self.n_rows = 0
        self.mean: np.ndarray | None = None
        self._squares: np.ndarray | None = None  # sum of squared deviations from the mean
        self.low: np.ndarray | None = None
        self.high: np.ndarray | None = None

    def update(self, rows: np.ndarray) -> None:
        """Add the float rows ``(m, n_features)`` of one batch (finite values)."""
        m = rows.shape[0]
        if m == 0:
            return
        mean = rows.mean(axis=0)
        squares = ((rows - mean) ** 2).sum(axis=0)
        if self.mean is None:
            self.n_rows, self.mean, self._squares = m, mean, squares
            self.low, self.high = rows.min(axis=0), rows.max(axis=0)
            return
        n = self.n_rows + m
        delta = mean - self.mean
        self.mean = self.mean + delta * (m / n)
        self._squares = self._squares + squares + delta**2 * (self.n_rows * m / n)
        self.n_rows = n
        self.low = np.minimum(self.low, rows.min(axis=0))
        self.high = np.maximum(self.high, rows.max(axis=0))

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self._squares / self.n_rows)
