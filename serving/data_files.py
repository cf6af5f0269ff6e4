"""Read scoring input from .npy, .npz, .csv or .parquet (no pickle, no torch)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

SUFFIXES = (".npy", ".npz", ".csv", ".parquet")


def read_rows(path: str | Path):
    """An array or DataFrame of samples from ``path``.

    ``.npz`` files give their ``X`` array, or their only array.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if "X" in data.files:
                return data["X"]
            if len(data.files) == 1:
                return data[data.files[0]]
            raise ValueError(f"{path} holds {data.files}; name the samples 'X'")
    if suffix in (".csv", ".parquet"):
        import pandas as pd

        return pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {SUFFIXES}")
