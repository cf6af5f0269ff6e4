"""Score a Spark DataFrame with a logged or registered detector (``pip install .[spark]``)."""

from __future__ import annotations

RESULT_TYPE = "score_samples double, decision double, label long"


def score_spark(spark, model_uri: str, frame, feature_columns: list[str] | None = None):
    """Add ``score_samples``, ``decision`` and ``label`` columns to the Spark DataFrame
    ``frame`` using ``mlflow.pyfunc.spark_udf`` (executors need this package and
    onnxruntime, not torch).

    ``feature_columns`` defaults to every column of ``frame``, in order.
    """
    import mlflow
    from pyspark.sql import functions

    columns = list(feature_columns or frame.columns)
    udf = mlflow.pyfunc.spark_udf(spark, model_uri, result_type=RESULT_TYPE,
                                  env_manager="local")
    scored = frame.withColumn("_divtri", udf(*[functions.col(c) for c in columns]))
    return scored.select("*", "_divtri.*").drop("_divtri")
