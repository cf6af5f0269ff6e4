"""The ``divtri fit``, ``divtri export`` and ``divtri score`` commands."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serving.data_files import read_rows


def fit_command(data: Path, out: Path, params: dict, *, drop_columns=(),
                checkpoint_dir: Path | None = None, resume: bool = False,
                mlflow_experiment: str | None = None, register: str | None = None):
    """Fit a detector with ``params`` on the samples in ``data`` (read as ``divtri score``
    reads them) and save it to ``out``; with ``mlflow_experiment``, inside an MLflow run
    (parameters, per-epoch metrics, the ONNX-backed model, registered as ``register``).
    ``drop_columns`` are left out of a table (ids, labels). Returns the fitted detector."""
    from anomaly import LatentEBMDetector

    if register is not None and mlflow_experiment is None:
        raise ValueError("--register needs --mlflow-experiment")
    rows = read_rows(data)
    if drop_columns:
        if not hasattr(rows, "drop"):
            raise ValueError(f"--drop-columns needs a CSV or parquet file with column names; "
                             f"{data} has none")
        missing = [c for c in drop_columns if c not in rows.columns]
        if missing:
            raise ValueError(f"--drop-columns {missing} are not columns of {data}: "
                             f"{[str(c) for c in rows.columns]}")
        rows = rows.drop(columns=list(drop_columns))
    detector = LatentEBMDetector(**params)
    fit_params = {} if checkpoint_dir is None else {"checkpoint_dir": checkpoint_dir,
                                                    "resume": resume}
    if mlflow_experiment is None:
        detector.fit(rows, **fit_params)
    else:
        import mlflow

        from serving.mlflow_model import fit_logged

        mlflow.set_experiment(mlflow_experiment)
        with mlflow.start_run(run_name=f"fit {Path(data).name}"):
            mlflow.log_param("data", str(data))
            fit_logged(detector, rows, registered_model_name=register, **fit_params)
    detector.save(out)
    return detector


def export_command(model_dir: Path, out: Path, graph: str = "scorer") -> Path:
    from anomaly import LatentEBMDetector
    from serving.export import export_onnx

    return export_onnx(LatentEBMDetector.load(model_dir), out, graph=graph)


def score_command(model: Path, data: Path, out: Path, alpha: float | None = None) -> int:
    """Score ``data`` with an .onnx file (torch is not imported) or a saved detector
    directory; write a CSV with score_samples, decision, label and p_value (NaN for an
    uncalibrated model). With ``alpha`` the label flags p-values at most ``alpha``.
    Returns the row count."""
    import pandas as pd

    from serving.runtime import check_alpha, conformal_labels

    if alpha is not None:
        check_alpha(alpha)
    rows = read_rows(data)
    if Path(model).suffix.lower() == ".onnx":
        from serving.runtime import OnnxDetector

        result = OnnxDetector(model).score_all(rows, alpha=alpha)
    else:
        import torch

        from anomaly import LatentEBMDetector
        from anomaly._rules import outlier_labels

        detector = LatentEBMDetector.load(model)
        if hasattr(rows, "to_numpy") and not hasattr(detector, "feature_names_in_"):
            rows = rows.to_numpy()
        score = detector.score_samples(rows)
        decision = score - detector.offset_
        calibrated = detector.scorer_.calibration_scores.shape[0] > 0
        if alpha is not None and not calibrated:
            raise ValueError("--alpha needs a calibrated model (calibrate(X_normal) or "
                             "calibration=0.2 when fitting)")
        # p-values from the scores already computed, not a second pass through the networks
        p_value = (detector.scorer_.p_values(torch.from_numpy(-score)).numpy() if calibrated
                   else np.full(len(score), np.nan))
        label = (outlier_labels(decision) if alpha is None
                 else conformal_labels(p_value, alpha))
        result = {"score_samples": score, "decision": decision, "label": label,
                  "p_value": p_value}
    frame = pd.DataFrame(result)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    return len(frame)
