"""Save and load a fitted detector as JSON + safetensors; nothing executes code on load."""

from __future__ import annotations

import hashlib
import json
import numbers
from importlib import metadata
from pathlib import Path

import numpy as np
import sklearn
import torch
from safetensors.torch import load_file, save_file

from training import AnomalyScorer, build_networks
from training.scorer import FLOAT64_BUFFERS

# 2: the scorer keeps a bank of training codes and the fused rule's calibration.
FORMAT_VERSION = 2
CONFIG_NAME = "detector.json"
WEIGHTS_NAME = "weights.safetensors"


def package_version() -> str:
    try:
        return metadata.version("divtri-anomaly")
    except metadata.PackageNotFoundError:
        return "unknown"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _json_param(value):
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (tuple, list)):
        return [_json_param(v) for v in value]
    # A RandomState instance cannot be written; the fitted weights do not need it.
    return None


def save_detector(detector, path: str | Path) -> Path:
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(detector)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    # Network weights were trained in float32, so storing them as float32 is lossless; the
    # preprocessing constants and the score's calibration (codes and statistics computed by
    # the float64 scorer) keep their precision.
    weights = {k: (v if k in FLOAT64_BUFFERS else v.to(torch.float32)).contiguous()
               for k, v in detector.scorer_.state_dict().items()}
    weights["training_mean"] = torch.from_numpy(np.ascontiguousarray(detector.training_mean_))
    weights_path = directory / WEIGHTS_NAME
    save_file(weights, str(weights_path))
    config = {
        "format_version": FORMAT_VERSION,
        "class": type(detector).__name__,
        "params": {k: _json_param(v) for k, v in detector.get_params().items()},
        "fitted": {
            "input_shape": list(detector.input_shape_),
            "sample_shape": list(detector._sample_shape),
            "n_features_in": int(detector.n_features_in_),
            "feature_names_in": (None if not hasattr(detector, "feature_names_in_")
                                 else [str(n) for n in detector.feature_names_in_]),
            "offset": float(detector.offset_),
            "score_rule": detector.score_rule_,
            "n_rollbacks": int(detector.n_rollbacks_),
            "training_history": detector.training_history_,
        },
        "versions": {"package": package_version(), "torch": torch.__version__,
                     "sklearn": sklearn.__version__},
        "weights_sha256": _sha256(weights_path),
    }
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return directory


def load_detector(cls, path: str | Path):
    directory = Path(path)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(f"{directory} holds no saved detector (expected {CONFIG_NAME} "
                                f"and {WEIGHTS_NAME})")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from err
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path} has format version {config.get('format_version')!r}; "
                         f"this package reads version {FORMAT_VERSION}")
    if _sha256(weights_path) != config.get("weights_sha256"):
        raise ValueError(f"{weights_path} does not match the checksum in {config_path}: the "
                         "file is corrupted or was modified")
    weights = load_file(str(weights_path))
    fitted = config["fitted"]
    detector = cls(**{k: tuple(v) if isinstance(v, list) else v
                      for k, v in config["params"].items()})
    input_shape = tuple(fitted["input_shape"])
    network_config = detector._network_config(input_shape)
    network_config = type(network_config)(**{**network_config.to_dict(),
                                             "input_shape": input_shape,
                                             "spectral_norm": False})
    networks = build_networks(network_config, with_energy=detector.objective == "triangle")
    training_mean = weights.pop("training_mean").numpy()
    scorer = AnomalyScorer(networks, weights["shift"], weights["scale"], input_shape,
                           fitted["score_rule"], detector.decoder_sigma,
                           code_bank=weights["code_bank"],
                           fusion_center=weights["fusion_center"],
                           fusion_spread=weights["fusion_spread"]).to(torch.float64)
    scorer.load_state_dict(weights, strict=True)
    detector.scorer_ = scorer.eval()
    detector.input_shape_ = input_shape
    detector._sample_shape = tuple(fitted["sample_shape"])
    detector.n_features_in_ = fitted["n_features_in"]
    if fitted["feature_names_in"] is not None:
        detector.feature_names_in_ = np.asarray(fitted["feature_names_in"], dtype=object)
    detector.offset_ = fitted["offset"]
    detector.score_rule_ = fitted["score_rule"]
    detector.n_rollbacks_ = fitted["n_rollbacks"]
    detector.training_history_ = fitted["training_history"]
    detector.training_mean_ = training_mean
    return detector
