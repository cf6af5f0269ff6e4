"""Load test of the MLflow REST server on loopback: bounded in requests and in time."""

from __future__ import annotations

import functools
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd


def _client(base: str, payload: dict, n_requests: int, *, stop_at: float) -> tuple[list, int]:
    import requests

    latencies, errors = [], 0
    with requests.Session() as session:
        for _ in range(n_requests):
            if time.monotonic() > stop_at:
                break
            started = time.perf_counter()
            try:
                ok = session.post(f"{base}/invocations", json=payload, timeout=30).status_code
                ok = ok == 200
            except Exception:
                ok = False
            latencies.append(time.perf_counter() - started)
            errors += not ok
    return latencies, errors


def rest_load(*, clients: int = 8, total_requests: int = 2000, workers: int = 2,
              rows_per_request: tuple[int, ...] = (1, 256), max_seconds: float = 300.0,
              epochs: int = 5) -> pd.DataFrame:
    """Fit a tabular detector, register it in a throwaway SQLite registry, serve it on
    127.0.0.1 and send ``total_requests`` per setting from ``clients`` threads."""
    import mlflow

    from anomaly import LatentEBMDetector
    from evaluation.tracking import throwaway_registry
    from serving.mlflow_model import feature_columns
    from serving.rest import mlflow_server

    rng = np.random.RandomState(0)
    X = rng.normal(size=(5000, 16))
    detector = LatentEBMDetector(epochs=epochs, random_state=0).fit(X)
    rows = []
    with throwaway_registry(detector, "load-test") as (uri, info, _):
        mlflow.MlflowClient().set_registered_model_alias("load-test", "prod",
                                                         info.registered_model_version)
        with mlflow_server("models:/load-test@prod", tracking_uri=uri,
                           workers=workers) as base:
            for n_rows in rows_per_request:
                payload = {"dataframe_split": {"columns": feature_columns(detector),
                                               "data": X[:n_rows].tolist()}}
                _client(base, payload, 20, stop_at=time.monotonic() + 30)  # warm-up
                per_client = [total_requests // clients + (i < total_requests % clients)
                              for i in range(clients)]
                stop_at = time.monotonic() + max_seconds
                started = time.perf_counter()
                with ThreadPoolExecutor(clients) as pool:
                    results = list(pool.map(
                        functools.partial(_client, base, payload, stop_at=stop_at),
                        per_client))
                wall = time.perf_counter() - started
                latencies = np.concatenate([np.asarray(r[0]) for r in results]) * 1e3
                rows.append({"rows_per_request": n_rows, "clients": clients,
                             "server_workers": workers,
                             "requests": len(latencies),
                             "errors": sum(r[1] for r in results),
                             "p50_ms": np.percentile(latencies, 50),
                             "p99_ms": np.percentile(latencies, 99),
                             "requests_per_s": len(latencies) / wall,
                             "rows_per_s": len(latencies) * n_rows / wall})
    return pd.DataFrame(rows)
