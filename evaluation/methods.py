"""The methods a benchmark compares: our detector, its VAE ablation and the peers.

Every method is built fresh per (dataset, seed) and scored as an anomaly score (higher = more
anomalous) on the same rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.ensemble import IsolationForest
from sklearn.neighbors import LocalOutlierFactor
from sklearn.svm import OneClassSVM

from anomaly import LatentEBMDetector
from evaluation.method_names import ALL_METHODS, PYOD_PEERS


@dataclass(frozen=True)
class MethodOptions:
    """Settings shared by the deep methods of one run (the peers keep their defaults)."""

    epochs: int | None = None
    image_shape: tuple[int, ...] | None = None
    detector_params: dict[str, Any] = field(default_factory=dict)


def _ours(objective: str, seed: int, options: MethodOptions) -> LatentEBMDetector:
    params = dict(options.detector_params)
    if options.epochs is not None:
        params["epochs"] = options.epochs
    if options.image_shape is not None:
        params["image_shape"] = options.image_shape
    if objective == "vae" and params.get("score_rule") == "energy":
        params["score_rule"] = "joint"
    return LatentEBMDetector(objective=objective, random_state=seed, **params)


def _pyod(name: str, seed: int) -> Any:
    try:
        from pyod.models import copod, ecod, hbos, knn, pca, vae
    except ImportError as err:
        raise ImportError("PyOD peers need the 'bench' extra: pip install 'divtri-anomaly[bench]'"
                          ) from err
    factories = {
        "pyod_knn": lambda: knn.KNN(),
        "pyod_ecod": lambda: ecod.ECOD(),
        "pyod_copod": lambda: copod.COPOD(),
        "pyod_hbos": lambda: hbos.HBOS(),
        "pyod_pca": lambda: pca.PCA(random_state=seed),
        "pyod_vae": lambda: vae.VAE(random_state=seed, verbose=0),
    }
    return factories[name]()


def make_method(name: str, seed: int, options: MethodOptions | None = None) -> Any:
    options = options or MethodOptions()
    builders: dict[str, Callable[[], Any]] = {
        "triangle": lambda: _ours("triangle", seed, options),
        "vae_ablation": lambda: _ours("vae", seed, options),
        "isolation_forest": lambda: IsolationForest(random_state=seed),
        "lof": lambda: LocalOutlierFactor(novelty=True),
        "ocsvm": lambda: OneClassSVM(),
    }
    if name in builders:
        return builders[name]()
    if name in PYOD_PEERS:
        return _pyod(name, seed)
    raise ValueError(f"unknown method {name!r}; choose from {ALL_METHODS}")


def anomaly_scores(method: Any, X: np.ndarray) -> np.ndarray:
    """Higher = more anomalous, whatever the library's sign convention."""
    if hasattr(method, "score_samples") and not hasattr(method, "decision_scores_"):
        return -np.asarray(method.score_samples(X), dtype=np.float64)
    return np.asarray(method.decision_function(X), dtype=np.float64)  # PyOD convention


def flat(X: np.ndarray) -> np.ndarray:
    return X.reshape(len(X), -1).astype(np.float64)
