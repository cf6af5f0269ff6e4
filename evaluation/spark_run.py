"""Score many rows with Spark in local mode and compare with local scoring."""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pandas as pd


def spark_run(n_rows: int = 500_000, n_features: int = 16, epochs: int = 3) -> pd.DataFrame:
    from pyspark.sql import SparkSession

    from anomaly import LatentEBMDetector
    from evaluation.tracking import throwaway_registry
    from serving.mlflow_model import feature_columns
    from serving.spark_scoring import score_spark

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    rng = np.random.RandomState(0)
    X = rng.normal(size=(n_rows, n_features))
    detector = LatentEBMDetector(epochs=epochs, random_state=0).fit(X[:5000])
    columns = feature_columns(detector)
    with throwaway_registry(detector, "spark-run") as (_, info, _):
        spark = (SparkSession.builder.master("local[*]").appName("divtri")
                 .config("spark.ui.enabled", "false")
                 .config("spark.driver.host", "127.0.0.1")
                 .config("spark.driver.bindAddress", "127.0.0.1").getOrCreate())
        try:
            frame = spark.createDataFrame(pd.DataFrame(X, columns=columns))
            started = time.perf_counter()
            scored = score_spark(spark, f"models:/spark-run/{info.registered_model_version}",
                                 frame).select("score_samples", "label").toPandas()
            wall = time.perf_counter() - started
        finally:
            spark.stop()
    local_started = time.perf_counter()
    local = detector.score_samples(X)
    local_wall = time.perf_counter() - local_started
    diff = np.abs(scored["score_samples"].to_numpy() - local)
    return pd.DataFrame([{
        "rows": n_rows, "spark_seconds": wall, "local_estimator_seconds": local_wall,
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float((diff / np.maximum(1.0, np.abs(local))).max()),
        "labels_equal": float((scored["label"].to_numpy() == detector.predict(X)).mean())}])
