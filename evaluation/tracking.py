"""Log a finished benchmark to MLflow: its options, every number of its tables, its files.

A metric is named ``<table>/<row>/<column>``, e.g. ``summary/triangle/auroc_mean`` or, for the
calibration suite, ``summary/digits_estimator_alpha_0.05/false_alarm_mean`` (other characters
than letters, digits and ``_-.:/`` become ``_``).
"""

from __future__ import annotations

import contextlib
import math
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

# Runs of characters other than those MLflow accepts in a metric name (spaces too, for
# readable names) become one "_".
_NOT_ALLOWED = re.compile(r"[^\w\-.:/]+")


def metric_name(*parts) -> str:
    return _NOT_ALLOWED.sub("_", "/".join(str(p) for p in parts))


def table_metrics(name: str, table: pd.DataFrame) -> dict[str, float]:
    """Every finite number of ``table`` as a metric."""
    metrics = {}
    for row, values in table.iterrows():
        for column, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                metrics[metric_name(name, row, column)] = float(value)
    return metrics


def log_bench_run(experiment: str, options: dict, out: Path, since: float) -> str:
    """One MLflow run in ``experiment`` with the bench ``options`` as parameters, the tables
    the bench wrote in ``out`` since the time ``since`` (a table is a CSV with a Markdown
    twin; raw result logs have none) as metrics, and those files, the raw CSVs and plots as
    artifacts. Returns the run id."""
    import mlflow

    out = Path(out)
    fresh = [p for p in sorted(out.iterdir())
             if p.is_file() and p.suffix in (".csv", ".md", ".png") and p.stat().st_mtime >= since]
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=f"bench {options.get('suite', '')}".strip()) as run:
        mlflow.log_params({key: str(value)[:500] for key, value in options.items()})
        for path in fresh:
            if path.suffix == ".csv" and path.with_suffix(".md").is_file():
                mlflow.log_metrics(table_metrics(path.stem, pd.read_csv(path, index_col=0)))
            mlflow.log_artifact(str(path), artifact_path="results")
    return run.info.run_id


@contextlib.contextmanager
def throwaway_registry(detector, name: str) -> Iterator[tuple[str, object, Path]]:
    """A temporary MLflow tracking store and registry (SQLite in a temporary directory)
    holding ``detector`` registered as model ``name``, for benchmarks that serve a registered
    model. Yields ``(tracking_uri, model_info, directory)``; the previous tracking URI is
    restored and everything is deleted on exit."""
    import mlflow

    from serving.mlflow_model import log_model

    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        try:
            experiment = mlflow.create_experiment(name, artifact_location=Path(tmp).as_uri())
            with mlflow.start_run(experiment_id=experiment):
                info = log_model(detector, "m", registered_model_name=name)
            yield uri, info, Path(tmp)
        finally:
            mlflow.set_tracking_uri(previous[0])
            mlflow.set_registry_uri(previous[1])
