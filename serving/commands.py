"""The ``divtri export`` and ``divtri score`` commands."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serving.data_files import read_rows


def export_command(model_dir: Path, out: Path, graph: str = "scorer") -> Path:
    from anomaly import LatentEBMDetector
    from serving.export import export_onnx

    return export_onnx(LatentEBMDetector.load(model_dir), out, graph=graph)


def score_command(model: Path, data: Path, out: Path) -> int:
    """Score ``data`` with an .onnx file (torch is not imported) or a saved detector
    directory; write a CSV with score_samples, decision and label. Returns the row count."""
    import pandas as pd

    rows = read_rows(data)
    if Path(model).suffix.lower() == ".onnx":
        from serving.runtime import OnnxDetector

        result = OnnxDetector(model).score_all(rows)
    else:
        from anomaly import LatentEBMDetector

        detector = LatentEBMDetector.load(model)
        if hasattr(rows, "to_numpy") and not hasattr(detector, "feature_names_in_"):
            rows = rows.to_numpy()
        score = detector.score_samples(rows)
        decision = score - detector.offset_
        result = {"score_samples": score, "decision": decision,
                  "label": np.where(decision < 0, -1, 1)}
    frame = pd.DataFrame(result)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    return len(frame)
