"""Resumable result files and summary tables (pandas)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import wilcoxon

KEY = ("dataset", "target", "seed", "method")


class ResultLog:
    """Rows appended to a CSV as soon as each finishes; a rerun skips the keys already there."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._done: set[tuple[str, ...]] = set()
        if self.path.is_file() and self.path.stat().st_size:
            existing = pd.read_csv(self.path, dtype=str)
            self._done = {tuple(row) for row in existing[list(KEY)].itertuples(index=False)}

    @staticmethod
    def key(**values) -> tuple[str, ...]:
        return tuple(str(values[k]) for k in KEY)

    def done(self, **values) -> bool:
        return self.key(**values) in self._done

    def append(self, row: dict) -> None:
        if self.path.is_file() and self.path.stat().st_size:
            # keep the file's columns (older logs may lack newer ones, such as "error")
            columns = pd.read_csv(self.path, nrows=0).columns
            row = {c: row.get(c, "") for c in columns}
        frame = pd.DataFrame([row])
        write_header = not self.path.is_file() or not self.path.stat().st_size
        frame.to_csv(self.path, mode="a", header=write_header, index=False)
        self._done.add(self.key(**row))

    def frame(self) -> pd.DataFrame:
        return pd.read_csv(self.path) if self.path.is_file() else pd.DataFrame()


def summary(frame: pd.DataFrame, metrics: tuple[str, ...] = ("auroc", "auprc")) -> pd.DataFrame:
    """Mean and std over everything but the method, one row per method, best AUROC first."""
    grouped = frame.groupby("method")[list(metrics)]
    table = grouped.mean().add_suffix("_mean").join(grouped.std().add_suffix("_std"))
    table["runs"] = frame.groupby("method").size()
    return table.sort_values(f"{metrics[0]}_mean", ascending=False)


def per_target(frame: pd.DataFrame, metric: str = "auroc") -> pd.DataFrame:
    """Mean over seeds: targets (held-out class or dataset) as rows, methods as columns."""
    return frame.pivot_table(index="target", columns="method", values=metric, aggfunc="mean")


def mean_rank(per_target_table: pd.DataFrame) -> pd.Series:
    """Mean rank of each method over the targets (1 = best, ties averaged, a missing result
    left out). Score-rule variants (``name[rule]``) are not ranked: they are the same fitted
    model, and counting them would push every other method down."""
    methods = [c for c in per_target_table.columns if "[" not in c]
    ranks = per_target_table[methods].rank(axis=1, ascending=False)
    return ranks.mean().rename("mean_rank")


def paired(frame: pd.DataFrame, reference: str, metric: str = "auroc") -> pd.DataFrame:
    """``reference`` against every other method on the runs both have (same dataset, target
    and seed): mean difference (reference minus method), the runs the reference wins and
    loses, and the two-sided Wilcoxon signed-rank p-value of the paired differences."""
    index = [k for k in KEY if k != "method"]
    wide = frame.pivot_table(index=index, columns="method", values=metric)
    rows = {}
    for method in wide.columns.drop(reference):
        both = wide[[reference, method]].dropna()
        diff = both[reference] - both[method]
        p_value = wilcoxon(diff).pvalue if (diff != 0).any() else np.nan
        rows[method] = {f"{metric}_difference": diff.mean(), "wins": int((diff > 0).sum()),
                        "losses": int((diff < 0).sum()), "runs": len(diff),
                        "wilcoxon_p": p_value}
    table = pd.DataFrame.from_dict(rows, orient="index").rename_axis(f"{reference} vs")
    return table.sort_values(f"{metric}_difference")


def markdown(table: pd.DataFrame, digits: int = 3) -> str:
    """Markdown with ``digits`` decimals for float columns and integers left as they are."""
    formats = [".0f" if pd.api.types.is_integer_dtype(table.index) else f".{digits}f"]
    formats += [".0f" if pd.api.types.is_integer_dtype(dtype) else f".{digits}f"
                for dtype in table.dtypes]
    return table.to_markdown(floatfmt=tuple(formats))


def write_tables(tables: dict[str, pd.DataFrame], out_dir: str | Path,
                 keep: Path | None = None) -> None:
    """Each table as ``<name>.csv`` and ``<name>.md`` in ``out_dir``. ``keep`` (a suite's raw,
    resumable results file) is never overwritten: a table of the same name is an error."""
    out_dir = Path(out_dir)
    clashes = [name for name in tables
               if keep is not None and (out_dir / f"{name}.csv").resolve() == Path(keep).resolve()]
    if clashes:
        raise ValueError(f"table {clashes[0]!r} would overwrite the raw results {keep}")
    for name, table in tables.items():
        table.to_csv(out_dir / f"{name}.csv")
        (out_dir / f"{name}.md").write_text(markdown(table) + "\n")
