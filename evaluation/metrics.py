"""Detection metrics; anomalies are the positive class, higher scores = more anomalous."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score


def detection_metrics(y_true: np.ndarray, anomaly_score: np.ndarray) -> dict[str, float]:
    return {"auroc": float(roc_auc_score(y_true, anomaly_score)),
            "auprc": float(average_precision_score(y_true, anomaly_score))}
