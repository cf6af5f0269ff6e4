"""Public API: the scikit-learn estimator for latent-EBM anomaly detection."""

from anomaly._detector import LatentEBMDetector

__all__ = ["LatentEBMDetector"]
