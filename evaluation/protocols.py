"""Train/test splits of docs/design.md section 5."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Split:
    """Training rows (labels unused) and test rows with ``y_test`` 1 = anomaly."""

    X_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray


# The shuffle of the held-out-class split that every suite's table uses unless told otherwise.
DEFAULT_SHUFFLE_SEED = 42


def held_out_class(X: np.ndarray, y: np.ndarray, held_out: int, *,
                   shuffle_seed: int = DEFAULT_SHUFFLE_SEED, train_fraction: float = 0.8) -> Split:
    """The papers' protocol: every class but ``held_out`` is normal; normals are shuffled with
    ``RandomState(shuffle_seed)``, the first ``train_fraction`` train; the test set is the other
    normals followed by every sample of the held-out class (the positives)."""
    if held_out not in set(np.unique(y).tolist()):
        raise ValueError(f"class {held_out} does not occur in y")
    normal = X[y != held_out]
    order = np.random.RandomState(shuffle_seed).permutation(len(normal))
    n_train = int(train_fraction * len(normal))
    anomalous = X[y == held_out]
    X_test = np.concatenate([normal[order[n_train:]], anomalous])
    y_test = np.concatenate([np.zeros(len(normal) - n_train, dtype=np.int64),
                             np.ones(len(anomalous), dtype=np.int64)])
    return Split(normal[order[:n_train]], X_test, y_test)


def _stratified_cap(X: np.ndarray, y: np.ndarray, cap: int, seed: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    if len(y) <= cap:
        return X, y
    from sklearn.model_selection import train_test_split

    X_kept, _, y_kept, _ = train_test_split(X, y, train_size=cap, stratify=y,
                                            random_state=seed)
    return X_kept, y_kept


def tabular(X: np.ndarray, y: np.ndarray, seed: int, *, test_fraction: float = 0.3,
            train_cap: int = 10_000, test_cap: int = 20_000,
            semi_supervised: bool = False) -> Split:
    """ADBench-style: stratified 70/30 split with ``seed``; the training rows (anomalies
    included, labels unused) are capped at ``train_cap`` and the test rows at ``test_cap`` by
    stratified subsampling, the same rows for every method. ``semi_supervised`` drops the
    anomalies from the training rows (the methods then learn from normal rows only); the test
    rows are the same either way."""
    from sklearn.model_selection import train_test_split

    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=test_fraction, stratify=y, random_state=seed)
    if semi_supervised:
        X_train, y_train = X_train[y_train == 0], y_train[y_train == 0]
    X_train, _ = _stratified_cap(X_train, y_train, train_cap, seed)
    X_test, y_test = _stratified_cap(X_test, y_test, test_cap, seed)
    return Split(X_train, X_test, y_test.astype(np.int64))
