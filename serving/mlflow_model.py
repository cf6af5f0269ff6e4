"""MLflow integration: per-epoch tracking and a registry-ready pyfunc model.

The pyfunc model's artifact is the fused ONNX scorer, so loading and serving it needs
onnxruntime, not torch. ``predict`` returns a DataFrame with ``score_samples``, ``decision``,
``label`` and ``p_value``; with the inference parameter ``feature_scores=True`` also a
``feature_scores`` column holding, per row, each feature's part of the anomaly score (in the
order of the input's columns). Use a database backend (``mlflow.set_tracking_uri("sqlite:///mlflow.db")``);
MLflow's file store is deprecated.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import infer_signature

ARTIFACT_KEY = "scorer"


class MlflowEpochLogger:
    """A ``fit(..., callbacks=[...])`` callback that logs every epoch's metrics to the active
    MLflow run (``seconds`` becomes ``time_per_epoch``)."""

    def __call__(self, epoch: int, metrics: dict[str, float]) -> None:
        values = {("time_per_epoch" if k == "seconds" else k): float(v)
                  for k, v in metrics.items() if k != "epoch"}
        mlflow.log_metrics(values, step=epoch)


class OnnxScorerModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around :class:`serving.runtime.OnnxDetector`.

    Logged "from code" (``mlflow_pyfunc_entry.py``), so loading unpickles nothing. The
    onnxruntime session is created on first use and is never part of a pickled state.
    """

    def __init__(self) -> None:
        self._path: str | None = None
        self._detector = None

    def load_context(self, context) -> None:
        self._path = context.artifacts[ARTIFACT_KEY]
        self._detector = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_detector": None}

    def _runtime(self):
        if self._detector is None:
            from serving.runtime import OnnxDetector

            self._detector = OnnxDetector(self._path)
        return self._detector

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        params = params or {}
        alpha = params.get("alpha")
        alpha = None if alpha is None or float(alpha) < 0 else float(alpha)
        attribution = params.get("feature_scores", False)
        if not isinstance(attribution, (bool, np.bool_)):
            raise MlflowException(f"feature_scores must be true or false, got {attribution!r}",
                                  error_code=INVALID_PARAMETER_VALUE)
        try:
            out = self._runtime().score_all(model_input, alpha=alpha,
                                            feature_scores=bool(attribution))
            if attribution:
                out["feature_scores"] = list(out["feature_scores"])
            return pd.DataFrame(out)
        except (ValueError, TypeError) as err:
            # The input is at fault (NaN, no rows, wrong width or columns): the REST server
            # answers 400 with this reason instead of a generic message and a stack trace.
            raise MlflowException(f"invalid input: {err}",
                                  error_code=INVALID_PARAMETER_VALUE) from None


def feature_columns(detector) -> list[str]:
    if hasattr(detector, "feature_names_in_"):
        return [str(c) for c in detector.feature_names_in_]
    return [f"x{i}" for i in range(detector.n_features_in_)]


def log_model(detector, name: str, registered_model_name: str | None = None,
              input_example: pd.DataFrame | np.ndarray | None = None, **kwargs):
    """Log a fitted detector as an MLflow pyfunc model backed by its ONNX scorer.

    Parameters
    ----------
    detector : LatentEBMDetector
        Fitted.
    name : str
        Model name inside the run.
    registered_model_name : str, optional
        Also register (or add a version to) this registry model.
    input_example : DataFrame or array of shape (n, n_features), optional
        Defaults to one row at the training mean.
    **kwargs
        Passed to ``mlflow.pyfunc.log_model``.

    Returns
    -------
    ModelInfo
    """
    from sklearn.utils.validation import check_is_fitted

    from serving.export import export_onnx

    check_is_fitted(detector)
    columns = feature_columns(detector)
    if input_example is None:
        input_example = detector.training_mean_.reshape(1, -1)
    example = pd.DataFrame(np.asarray(input_example, dtype=np.float64).reshape(
        -1, detector.n_features_in_), columns=columns)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(detector, Path(tmp) / "scorer.onnx")
        from serving.runtime import OnnxDetector

        output = pd.DataFrame(OnnxDetector(onnx_path).score_all(example))
        kwargs.setdefault("pip_requirements", _requirements())
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(Path(__file__).with_name("mlflow_pyfunc_entry.py")),
            artifacts={ARTIFACT_KEY: str(onnx_path)},
            # alpha < 0 (the default) keeps the exported threshold; in (0, 1) a request
            # flags p-values at most alpha (a calibrated model only). feature_scores=True
            # adds each feature's part of the score.
            signature=infer_signature(example, output,
                                      params={"alpha": -1.0, "feature_scores": False}),
            input_example=example,
            registered_model_name=registered_model_name,
            **kwargs,
        )


def _requirements() -> list[str]:
    from importlib import metadata

    names = ["onnxruntime-gpu", "onnxruntime", "onnx", "numpy", "pandas", "divtri-anomaly"]
    pins = []
    for dist in names:
        try:
            pins.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def load_model(model_uri: str):
    """``mlflow.pyfunc.load_model``: ``runs:/...``, ``models:/<name>/<version>`` or
    ``models:/<name>@<alias>``. ``predict(DataFrame)`` returns score_samples, decision, label."""
    return mlflow.pyfunc.load_model(model_uri)


def fit_logged(detector, X, *, run_name: str | None = None, model_name: str = "detector",
               registered_model_name: str | None = None, batches=None, **fit_params):
    """Fit ``detector`` inside an MLflow run: parameters, per-epoch metrics and the model.

    Uses the active run if there is one; ``fit_params`` go to ``fit`` (e.g.
    ``checkpoint_dir``). With ``batches`` (and ``X=None``) the fit is
    ``fit_stream(batches)``. Returns ``(detector, model_info)``.
    """
    active = mlflow.active_run()
    context = mlflow.start_run(run_name=run_name) if active is None else contextlib.nullcontext()
    with context:
        mlflow.log_params({k: str(v) for k, v in detector.get_params().items()})
        if batches is None:
            detector.fit(X, callbacks=[MlflowEpochLogger()], **fit_params)
        else:
            detector.fit_stream(batches, callbacks=[MlflowEpochLogger()], **fit_params)
        mlflow.log_metric("n_rollbacks", detector.n_rollbacks_)
        info = log_model(detector, model_name, registered_model_name=registered_model_name)
    return detector, info
