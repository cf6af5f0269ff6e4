"""Input validation shared by the estimator's public methods."""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.utils.validation import validate_data

from anomaly._rules import accepted_sample_shapes, check_missing


def image_shape_tuple(image_shape) -> tuple[int, int, int]:
    """``(H, W)`` or ``(C, H, W)`` -> ``(C, H, W)``; a clear error for anything else."""
    try:
        shape = tuple(image_shape)
    except TypeError:
        raise TypeError(f"image_shape must be (H, W) or (C, H, W), got {image_shape!r}") from None
    if len(shape) not in (2, 3) or not all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in shape
    ):
        raise ValueError(f"image_shape must be (H, W) or (C, H, W) of positive ints, "
                         f"got {image_shape!r}")
    shape = tuple(int(s) for s in shape)
    return shape if len(shape) == 3 else (1, *shape)


def _sample_shape(X) -> tuple[int, ...] | None:
    """The per-sample shape of an image batch ``(n, H, W)`` / ``(n, C, H, W)``, else None."""
    ndim = getattr(X, "ndim", None)
    if ndim is None and isinstance(X, (list, tuple)):
        try:
            ndim = np.asarray(X).ndim
        except ValueError:  # ragged: validate_data reports it
            return None
    if ndim is None or ndim <= 2:
        return None
    if ndim > 4:
        raise ValueError(f"expected 2-D rows or images (n, H, W) / (n, C, H, W); got {ndim}-D "
                         "input")
    return tuple(int(s) for s in np.shape(X)[1:])


def validate_samples(estimator, X, *, reset: bool, allow_nan: bool = False
                     ) -> tuple[np.ndarray, tuple[int, ...] | None]:
    """Check ``X`` and return it as float64 rows ``(n, n_features)`` plus the per-sample image
    shape it came in (None for 2-D input).

    Rejects inf, empty input, 1-D input, sparse matrices, strings, object arrays that are
    not numbers and complex numbers with a ValueError/TypeError naming the problem, and (when
    ``reset`` is False) a feature count or image shape other than the one seen in ``fit``.
    NaN (a missing entry) is refused unless ``allow_nan``; then a row with no observed entry
    is refused.
    """
    sample_shape = _sample_shape(X)
    if sample_shape is not None:
        X = np.asarray(X)
        X = X.reshape(X.shape[0], -1)
        if not reset:
            expected = tuple(estimator._sample_shape)
            if sample_shape not in accepted_sample_shapes(expected, estimator.input_shape_):
                raise ValueError(
                    f"X has samples of shape {sample_shape}, but {type(estimator).__name__} "
                    f"was fitted on samples of shape {expected}"
                )
    X = validate_data(estimator, X, reset=reset, dtype=np.float64,
                      ensure_all_finite="allow-nan", accept_sparse=False, ensure_min_samples=1,
                      ensure_min_features=1)
    # torch cannot wrap a view with negative strides (X[::-1]); copy only such views
    X = np.ascontiguousarray(X)
    check_missing(X, allow_nan, type(estimator).__name__,
                  "fit it with missing='mask' to learn and score with missing entries, or "
                  "impute them before")
    return X, sample_shape
