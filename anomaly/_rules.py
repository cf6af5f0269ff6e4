"""Rules that the estimator, its exported graph and the torch-free runtime must agree on.

Pure Python and numpy (``outlier_labels`` also takes torch tensors), so that
``serving.runtime`` can import them without torch.
"""

from __future__ import annotations

from importlib import metadata

import numpy as np


def package_version() -> str:
    """The installed version of this package ("unknown" when run from a source tree)."""
    try:
        return metadata.version("divtri-anomaly")
    except metadata.PackageNotFoundError:
        return "unknown"


def outlier_labels(decision):
    """+1 inlier / -1 outlier by the sign of ``decision`` (numpy array or torch tensor,
    ``(n,)``, returned as int64 of the same kind): negative is an outlier."""
    return 1 - 2 * (decision < 0)


def accepted_sample_shapes(sample_shape: tuple[int, ...], input_shape: tuple[int, ...]
                           ) -> tuple[tuple[int, ...], ...]:
    """The per-sample shapes a fitted model scores, besides flat rows: the shape it was
    fitted on, the networks' ``(C, H, W)``, and ``(H, W)`` for one channel."""
    shapes = [tuple(sample_shape), tuple(input_shape)]
    if len(input_shape) == 3 and input_shape[0] == 1:
        shapes.append(tuple(input_shape[1:]))
    return tuple(dict.fromkeys(shapes))


def check_missing(rows: np.ndarray, allow_nan: bool, owner: str, remedy: str) -> None:
    """Refuse NaN in float rows ``(n, n_features)`` where missing entries are not allowed
    (the error names ``owner`` and says ``remedy``), and rows with no observed entry where
    they are."""
    missing = np.isnan(rows)
    if not missing.any():
        return
    if not allow_nan:
        raise ValueError(f"Input X contains NaN, and this {owner} does not take missing "
                         f"values: {remedy}")
    empty = np.flatnonzero(missing.all(axis=1))
    if empty.size:
        raise ValueError(f"Input X has rows with every entry missing (NaN), which cannot be "
                         f"scored: rows {empty[:10].tolist()}"
                         + (f" and {empty.size - 10} more" if empty.size > 10 else ""))
