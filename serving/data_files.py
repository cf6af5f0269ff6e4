"""Read scoring input from .npy, .npz, .csv or .parquet (no pickle, no torch)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

SUFFIXES = (".npy", ".npz", ".csv", ".parquet")


def read_rows(path: str | Path):
    """An array or DataFrame of samples from ``path``.

    ``.npz`` files give their ``X`` array, or their only array. A CSV file whose first line
    is all numbers has no header: it is read as data, so that no row is lost (a header of
    the column numbers 0, 1, 2, ... that pandas writes for an unnamed frame is a header).
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
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        import pandas as pd

        return pd.read_parquet(path)
    raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {SUFFIXES}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_csv(path: Path):
    import pandas as pd

    frame = pd.read_csv(path)
    names = [str(c) for c in frame.columns]
    # pandas renames repeated header values ("1.5", "1.5.1"), so test the raw first line.
    with open(path, newline="") as file:
        first = next(csv.reader(file), [])
    column_numbers = [str(i) for i in range(len(names))]
    # an empty field is a missing value, not a column name; a line of them is no header
    values = [v for v in first if v.strip()]
    if values and all(_is_number(v) for v in values) and first != column_numbers:
        return pd.read_csv(path, header=None)
    return frame
