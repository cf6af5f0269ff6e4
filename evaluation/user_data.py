"""Labelled tables of the user's own (CSV, parquet, npz): load them, or say what is wrong.

Every problem a user can fix is a :class:`DataError` whose message names the file, the
columns or values at fault and what to do; the command line prints it as one line.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

TABLE_SUFFIXES = (".csv", ".parquet", ".npz")
# A stratified split needs an anomaly on each side, and a fit needs more than one row.
MIN_ANOMALIES = 2
MIN_NORMALS = 2


class DataError(ValueError):
    """A problem with the user's data file, explained so that the user can fix it."""


def labelled_files(path: str | Path) -> dict[str, Path]:
    """The data files at ``path`` (one file, or every CSV, parquet and npz file of a
    directory, not recursive), by name (the file's stem), in name order."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and p.suffix.lower() in TABLE_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no {', '.join(TABLE_SUFFIXES)} files in this directory")
    elif path.is_file():
        if path.suffix.lower() not in TABLE_SUFFIXES:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of "
                            f"{', '.join(TABLE_SUFFIXES)}")
        files = [path]
    else:
        raise DataError(f"{path}: no such file or directory")
    names: dict[str, Path] = {}
    for file in files:
        if file.stem in names:
            raise DataError(f"{names[file.stem]} and {file} have the same name; rename one")
        names[file.stem] = file
    return names


def anomaly_labels(values, *, source: str, anomaly_label: str | None = None) -> np.ndarray:
    """Map a label column of exactly two values to 1 = anomaly, 0 = normal.

    Labels 0/1 (or booleans) need no mapping: 1 is the anomaly. Any other pair (strings such
    as "normal" / "fraud", or -1 / 1) needs ``anomaly_label``, the value that marks anomalies,
    compared as text so that it can come from the command line.
    """
    labels = pd.Series(np.asarray(values).reshape(-1))
    if labels.isna().any():
        raise DataError(f"{source}: {int(labels.isna().sum())} rows have no label; drop them "
                        "or give them one")
    counts = labels.value_counts()
    described = ", ".join(f"{value!r} ({count} rows)" for value, count in counts.items())
    if len(counts) != 2:
        raise DataError(
            f"{source}: the label must take exactly two values (normal, anomaly), found "
            f"{len(counts)}: {described}. Map them to two first, e.g. 0 = normal and "
            "1 = anomaly")
    if anomaly_label is not None:
        as_text = labels.astype(str)
        if anomaly_label not in set(as_text):
            raise DataError(f"{source}: --anomaly-label {anomaly_label!r} is not a label "
                            f"value; the values are {described}")
        return (as_text == anomaly_label).to_numpy(np.int64)
    if set(counts.index) <= {0, 1}:  # also True / False, and 0.0 / 1.0
        return labels.astype(np.int64).to_numpy()
    raise DataError(f"{source}: labels {described} are not 0/1; say which value marks an "
                    "anomaly with --anomaly-label VALUE")


def _read_frame(path: Path) -> pd.DataFrame:
    try:
        if path.suffix.lower() == ".csv":
            return pd.read_csv(path)
        return pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except (ValueError, OSError) as err:  # pyarrow's and pandas' parse errors
        raise DataError(f"{path}: cannot be read as {path.suffix[1:]}: {err}") from None


def _features_from_frame(frame: pd.DataFrame, path: Path, label_column: str | None,
                         drop_columns: Sequence[str]) -> tuple[np.ndarray, pd.Series]:
    if label_column is None:
        raise DataError(f"{path}: name the label column with --label-column; the columns "
                        f"are {list(frame.columns)}")
    if label_column not in frame.columns:
        raise DataError(f"{path}: no column {label_column!r}; the columns are "
                        f"{list(frame.columns)}")
    unknown = [c for c in drop_columns if c not in frame.columns]
    if unknown:
        raise DataError(f"{path}: --drop-columns names {unknown}, which are not columns; the "
                        f"columns are {list(frame.columns)}")
    features = frame.drop(columns=[label_column, *drop_columns])
    if features.shape[1] == 0:
        raise DataError(f"{path}: no feature columns left besides the label {label_column!r}")
    non_numeric = [c for c in features.columns
                   if not (pd.api.types.is_numeric_dtype(features[c])
                           and not pd.api.types.is_complex_dtype(features[c]))]
    if non_numeric:
        raise DataError(f"{path}: non-numeric feature columns {non_numeric}; encode them as "
                        "numbers, or leave them out with --drop-columns "
                        f"{','.join(map(str, non_numeric))}")
    for column in features.columns:
        values = features[column]
        if (pd.api.types.is_integer_dtype(values) and len(values) > 2
                and values.is_unique and (values.is_monotonic_increasing
                                          or values.is_monotonic_decreasing)):
            logger.warning("%s: column %r holds a different, ordered integer in every row, "
                           "like a row id; if it is one, leave it out with --drop-columns",
                           path, column)
    return features.to_numpy(np.float64), frame[label_column]


def load_labelled_table(path: str | Path, *, label_column: str | None = None,
                        anomaly_label: str | None = None,
                        drop_columns: Sequence[str] = ()) -> tuple[np.ndarray, np.ndarray]:
    """Features ``X`` (n, d) float64 and labels ``y`` (n,) with 1 = anomaly from one file.

    CSV and parquet: every column but ``label_column`` and ``drop_columns`` is a feature.
    npz: the arrays ``X`` and ``y`` (``label_column`` and ``drop_columns`` do not apply).
    """
    path = Path(path)
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if not {"X", "y"} <= set(data.files):
                raise DataError(f"{path}: an npz file needs arrays 'X' and 'y', it holds "
                                f"{data.files}")
            X, labels = data["X"], data["y"]
        if X.ndim != 2 or len(labels) != len(X):
            raise DataError(f"{path}: expected X (n, d) and y (n,), got {X.shape} and "
                            f"{labels.shape}")
        if not np.issubdtype(X.dtype, np.number):
            raise DataError(f"{path}: X has dtype {X.dtype}, not numbers")
        X = X.astype(np.float64)
        columns = [f"column {i}" for i in range(X.shape[1])]
    else:
        frame = _read_frame(path)
        if frame.empty:
            raise DataError(f"{path}: the file has no rows")
        X, labels = _features_from_frame(frame, path, label_column, drop_columns)
        columns = [str(c) for c in frame.columns if c != label_column and c not in drop_columns]
    if len(X) == 0:
        raise DataError(f"{path}: the file has no rows")
    y = anomaly_labels(labels, source=str(path), anomaly_label=anomaly_label)
    missing = ~np.isfinite(X)
    if missing.any():
        where = [columns[j] for j in np.flatnonzero(missing.any(axis=0))]
        raise DataError(f"{path}: missing or infinite values in columns {where} "
                        f"({int(missing.sum())} cells); the detectors compared here need "
                        "complete rows: drop those rows or columns, or impute them first")
    n_anomalies = int(y.sum())
    if n_anomalies < MIN_ANOMALIES or len(y) - n_anomalies < MIN_NORMALS:
        raise DataError(f"{path}: {n_anomalies} anomalies and {len(y) - n_anomalies} normal "
                        f"rows; the split needs at least {MIN_ANOMALIES} of each")
    return X, y
