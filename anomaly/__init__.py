"""Public API: the scikit-learn estimator for latent-EBM anomaly detection."""

__all__ = ["LatentEBMDetector"]


def __getattr__(name: str):
    # Imported on first use, so that the torch-free runtime can import ``anomaly._rules``
    # without importing torch through the estimator.
    if name == "LatentEBMDetector":
        from anomaly._detector import LatentEBMDetector

        return LatentEBMDetector
    raise AttributeError(f"module 'anomaly' has no attribute {name!r}")
