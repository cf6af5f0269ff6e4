"""Read scoring input from .npy, .npz, .csv or .parquet (no pickle, no torch), whole or in
batches of rows."""

from __future__ import annotations

import csv
from collections.abc import Iterator
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


def _csv_has_header(path: Path) -> bool:
    """False when the first line is all numbers (data, not names), except the header of
    column numbers 0, 1, 2, ... that pandas writes for an unnamed frame."""
    # pandas renames repeated header values ("1.5", "1.5.1"), so test the raw first line.
    with open(path, newline="") as file:
        first = next(csv.reader(file), [])
    column_numbers = [str(i) for i in range(len(first))]
    # an empty field is a missing value, not a column name; a line of them is no header
    values = [v for v in first if v.strip()]
    return not (values and all(_is_number(v) for v in values) and first != column_numbers)


def _read_csv(path: Path):
    import pandas as pd

    return pd.read_csv(path, header=0 if _csv_has_header(path) else None)


def _parquet_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".parquet")
        if not files:
            raise ValueError(f"{path} is a directory without .parquet files")
        return files
    return [path]


def iter_row_batches(path: str | Path, batch_rows: int) -> Iterator:
    """The samples of ``path`` as arrays or DataFrames of at most ``batch_rows`` rows, in
    file order, without holding the whole file: ``.npy`` is memory-mapped, ``.csv`` read in
    chunks, ``.parquet`` (a file, or a directory of them read in name order) by record
    batches. ``.npz`` files are read whole (a compressed archive cannot be mapped)."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be positive, got {batch_rows}")
    path = Path(path)
    suffix = ".parquet" if path.is_dir() else path.suffix.lower()
    if suffix == ".csv":
        import pandas as pd

        with pd.read_csv(path, header=0 if _csv_has_header(path) else None,
                         chunksize=batch_rows) as chunks:
            yield from chunks
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for file in _parquet_files(path):
            # pre-buffering keeps the column chunks it read ahead: memory then grew with the
            # file (+250 MB per 3M rows x 16 columns, measured); without it, batches stay flat
            with pq.ParquetFile(file, pre_buffer=False) as parquet:
                for batch in parquet.iter_batches(batch_size=batch_rows):
                    yield batch.to_pandas()
    else:
        rows = (np.load(path, mmap_mode="r", allow_pickle=False) if suffix == ".npy"
                else read_rows(path))
        for start in range(0, max(len(rows), 1), batch_rows):
            yield np.asarray(rows[start:start + batch_rows])
