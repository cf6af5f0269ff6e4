"""Datasets for the benchmarks. Nothing here downloads unless asked to (``download=True``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

MNIST_TRAIN_PARTS = 4
MNIST_TRAIN_ROWS = 60_000  # mnist() returns MNIST's training set first, then its test set


def digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (no download): X (1797, 8, 8) float64 in [0, 16], y."""
    bunch = load_digits()
    return bunch.images.astype(np.float64), bunch.target.astype(np.int64)


def mnist(root: str | Path | None = None, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """All 70,000 MNIST images, training set first: X (70000, 28, 28) uint8, y.

    ``root`` is a directory with ``mnist_train_part{0..3}.npz`` and ``mnist_test.npz`` (the
    layout of ``shared/data/mnist``). Without it, torchvision's copy is used; it is fetched
    only when ``download=True``.
    """
    if root is not None and (Path(root) / "mnist_test.npz").is_file():
        root = Path(root)
        parts = [np.load(root / f"mnist_train_part{i}.npz") for i in range(MNIST_TRAIN_PARTS)]
        parts.append(np.load(root / "mnist_test.npz"))
        return (np.concatenate([p["X"] for p in parts]),
                np.concatenate([p["y"] for p in parts]).astype(np.int64))
    from torchvision.datasets import MNIST

    cache = Path(root) if root is not None else Path.home() / ".cache" / "divtri"
    sets = [MNIST(str(cache), train=train, download=download) for train in (True, False)]
    return (np.concatenate([s.data.numpy() for s in sets]),
            np.concatenate([s.targets.numpy() for s in sets]).astype(np.int64))


def labelled_images(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A labelled image set saved as npz with ``X`` (n, H, W) or (n, H, W, C) and ``y``.

    Channels-last input is returned channels-first, (n, C, H, W).
    """
    with np.load(path) as data:
        X, y = data["X"], data["y"]
    if X.ndim == 4:
        X = np.moveaxis(X, -1, 1)
    if X.ndim not in (3, 4) or len(X) != len(y):
        raise ValueError(f"{path}: expected X (n, H, W) or (n, H, W, C) and y (n,), "
                         f"got {X.shape} and {y.shape}")
    return X, y.astype(np.int64)


def _adbench_name(path: Path) -> tuple[int | float, str]:
    """(ADBench's number, name) of ``NN_name.npz``; a file named otherwise keeps its whole
    stem as its name and sorts after the numbered ones."""
    number, _, rest = path.stem.partition("_")
    if number.isdigit() and rest:
        return int(number), rest
    return float("inf"), path.stem


def adbench(directory: str | Path) -> dict[str, Path]:
    """The npz files in ``directory``, by name: ADBench's ``NN_name.npz`` as ``name`` in
    numeric order, then any other file under its own stem, in name order."""
    files = sorted(Path(directory).glob("*.npz"), key=_adbench_name)
    named: dict[str, Path] = {}
    for path in files:
        name = _adbench_name(path)[1]
        if name in named:
            raise ValueError(f"{named[name]} and {path} both give the data set name {name!r}; "
                             "rename one")
        named[name] = path
    return named


def load_adbench_file(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        return data["X"].astype(np.float64), data["y"].astype(np.int64)
