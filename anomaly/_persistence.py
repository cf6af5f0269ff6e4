"""Save and load a fitted detector as JSON + safetensors; nothing executes code on load.

Format 3 (written now): ``detector.json`` holds the estimator's parameters, the fitted
attributes, the resolved network configuration (every field that shapes a tensor, so a model
loads whatever the defaults of a later version) and a sha256 over its own content; the
weights live in ``weights-<hash>.safetensors``, named by their sha256. A save writes the new
weights under a new name, then replaces the JSON in one atomic rename, then deletes the old
weights: a save killed at any point leaves the old model or the new one, loadable. Files
left by a killed save (a ``*.tmp``, unreferenced weights) are removed by the next save.
Format 2 (read only): fixed ``weights.safetensors``, networks rebuilt from the parameters.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
from pathlib import Path

import numpy as np
import sklearn
import torch
from safetensors.torch import load, save

from anomaly._rules import package_version
from training import AnomalyScorer, NetworkConfig, build_networks
from training.scorer import (
    BANK_NEIGHBOURHOOD_BUFFERS,
    CODE_DISTRIBUTION_BUFFERS,
    FLOAT64_BUFFERS,
    MISSING_BUFFERS,
    STANDARDISED_RULES,
)
from training.scorer_ensemble import ScorerEnsemble

# 2: the scorer keeps a bank of training codes and the fused rule's calibration.
# 3: self-describing networks, a checksum over the whole JSON, content-named weights.
FORMAT_VERSION = 3
READABLE_VERSIONS = (2, 3)
CONFIG_NAME = "detector.json"
LEGACY_WEIGHTS_NAME = "weights.safetensors"
WEIGHTS_PATTERN = "weights*.safetensors"
TEMP_SUFFIX = ".tmp"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _config_sha256(config: dict) -> str:
    """sha256 of the JSON content other than the checksum itself, in a canonical form."""
    body = {k: v for k, v in config.items() if k != "sha256"}
    return _sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one."""
    temp = path.with_name(path.name + TEMP_SUFFIX)
    with open(temp, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, path)


def _sync_directory(directory: Path) -> None:
    """Make the renames in ``directory`` durable (a no-op where directories cannot be
    opened, as on Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _referenced_weights(directory: Path) -> str | None:
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None
    if config.get("format_version") == 2:
        return LEGACY_WEIGHTS_NAME
    name = config.get("weights_file")
    return name if isinstance(name, str) else None


def _remove_litter(directory: Path) -> None:
    """Delete what an interrupted save left: temp files, and weights files that the JSON
    does not name. Only this module's own file names are touched."""
    keep = _referenced_weights(directory)
    for pattern in (CONFIG_NAME + TEMP_SUFFIX, WEIGHTS_PATTERN, WEIGHTS_PATTERN + TEMP_SUFFIX):
        for path in directory.glob(pattern):
            if path.name != keep:
                path.unlink(missing_ok=True)


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
    _remove_litter(directory)
    # Network weights were trained in float32, so storing them as float32 is lossless; the
    # preprocessing constants and the score's calibration (codes and statistics computed by
    # the float64 scorer) keep their precision.
    weights = {k: (v if k.rpartition(".")[2] in FLOAT64_BUFFERS
                   else v.to(torch.float32)).contiguous()
               for k, v in detector.scorer_.state_dict().items()}
    weights["training_mean"] = torch.from_numpy(np.ascontiguousarray(detector.training_mean_))
    data = save(weights)
    weights_sha256 = _sha256(data)
    weights_name = f"weights-{weights_sha256[:16]}.safetensors"
    _write_atomically(directory / weights_name, data)
    network = detector._network_config(detector.input_shape_).to_dict()
    network["spectral_norm"] = False  # the fitted weights are stored normalised
    config = {
        "format_version": FORMAT_VERSION,
        "class": type(detector).__name__,
        "params": {k: _json_param(v) for k, v in detector.get_params().items()},
        "network": network,
        "fitted": {
            "input_shape": list(detector.input_shape_),
            "sample_shape": list(detector._sample_shape),
            "n_features_in": int(detector.n_features_in_),
            "feature_names_in": (None if not hasattr(detector, "feature_names_in_")
                                 else [str(n) for n in detector.feature_names_in_]),
            "offset": float(detector.offset_),
            "score_rule": detector.score_rule_,
            "decoder_sigma": float(detector.scorer_.decoder_sigma),
            "allows_missing": bool(detector.scorer_.allows_missing),
            "n_rollbacks": int(detector.n_rollbacks_),
            "n_members": int(detector.n_members_),
            "training_history": detector.training_history_,
        },
        "versions": {"package": package_version(), "torch": torch.__version__,
                     "sklearn": sklearn.__version__},
        "weights_file": weights_name,
        "weights_sha256": weights_sha256,
    }
    config["sha256"] = _config_sha256(config)
    _write_atomically(directory / CONFIG_NAME, json.dumps(config, indent=2).encode())
    _sync_directory(directory)
    _remove_litter(directory)  # the previous weights
    return directory


def _read_config(directory: Path) -> dict:
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} holds no saved detector (no {CONFIG_NAME})")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON: {err}") from err
    if not isinstance(config, dict) or config.get("format_version") not in READABLE_VERSIONS:
        version = config.get("format_version") if isinstance(config, dict) else None
        raise ValueError(f"{config_path} has format version {version!r}; this package reads "
                         f"versions {READABLE_VERSIONS}")
    if config["format_version"] >= 3 and config.get("sha256") != _config_sha256(config):
        raise ValueError(f"{config_path} does not match its own checksum: the file was "
                         "modified after saving (configuration, fitted values or threshold)")
    return config


def _read_weights(directory: Path, config: dict) -> dict[str, torch.Tensor]:
    name = config.get("weights_file", LEGACY_WEIGHTS_NAME)
    weights_path = directory / str(name)
    if Path(str(name)).name != name or not weights_path.is_file():
        raise FileNotFoundError(f"{directory} holds no weights file {name!r}")
    data = weights_path.read_bytes()
    if _sha256(data) != config.get("weights_sha256"):
        raise ValueError(f"{weights_path} does not match the checksum in {CONFIG_NAME}: the "
                         "file is corrupted or was modified")
    return load(data)


def load_detector(cls, path: str | Path):
    directory = Path(path)
    config = _read_config(directory)
    weights = _read_weights(directory, config)
    fitted = config["fitted"]
    detector = cls(**{k: tuple(v) if isinstance(v, list) else v
                      for k, v in config["params"].items()})
    input_shape = tuple(fitted["input_shape"])
    if "network" in config:
        network_config = NetworkConfig.from_dict(config["network"])
        decoder_sigma = fitted["decoder_sigma"]
    else:  # format 2: the networks as today's code builds them from the parameters
        network_config = detector._network_config(input_shape)
        network_config = NetworkConfig.from_dict({**network_config.to_dict(),
                                                  "input_shape": input_shape,
                                                  "spectral_norm": False})
        decoder_sigma = detector.decoder_sigma
    training_mean = weights.pop("training_mean").numpy()
    # models saved before calibration existed have no calibration scores
    weights.setdefault("calibration_scores", torch.zeros(0, dtype=torch.float64))
    n_members = fitted.get("n_members", 1)  # models saved before ensembles have one

    def member_scorer(member_weights: dict[str, torch.Tensor]) -> AnomalyScorer:
        return _load_scorer(member_weights, network_config, detector.objective, input_shape,
                            fitted, decoder_sigma, directory)

    if n_members == 1:
        scorer = member_scorer(weights)
    else:
        members = []
        for i in range(n_members):
            prefix = f"members.{i}."
            member_weights = {k.removeprefix(prefix): v for k, v in weights.items()
                              if k.startswith(prefix)}
            if not member_weights:
                raise ValueError(f"{directory}: the weights hold no member {i} of the "
                                 f"{n_members} the configuration says")
            members.append(member_scorer(member_weights))
        scorer = ScorerEnsemble(members, calibration_scores=weights["calibration_scores"])
    detector.scorer_ = scorer.eval()
    detector.input_shape_ = input_shape
    detector._sample_shape = tuple(fitted["sample_shape"])
    detector.n_features_in_ = fitted["n_features_in"]
    if fitted["feature_names_in"] is not None:
        detector.feature_names_in_ = np.asarray(fitted["feature_names_in"], dtype=object)
    detector.offset_ = fitted["offset"]
    detector.score_rule_ = fitted["score_rule"]
    detector.n_rollbacks_ = fitted["n_rollbacks"]
    detector.n_members_ = n_members
    detector.training_history_ = fitted["training_history"]
    detector.training_mean_ = training_mean
    return detector


def _load_scorer(weights: dict[str, torch.Tensor], network_config: NetworkConfig,
                 objective: str, input_shape: tuple[int, ...], fitted: dict,
                 decoder_sigma: float, directory: Path) -> AnomalyScorer:
    """One scorer from its saved tensors (keys as in its own ``state_dict``), completing
    what models saved by earlier versions lack."""
    weights = dict(weights)
    networks = build_networks(network_config, with_energy=objective == "triangle")
    scorer = AnomalyScorer(networks, weights["shift"], weights["scale"], input_shape,
                           fitted["score_rule"], decoder_sigma,
                           code_bank=weights["code_bank"],
                           fusion_center=weights["fusion_center"],
                           fusion_spread=weights["fusion_spread"],
                           calibration_scores=weights["calibration_scores"],
                           # models saved before missing values were allowed refuse them
                           allows_missing=fitted.get("allows_missing", False)
                           ).to(torch.float64)
    if all(name in weights for name in BANK_NEIGHBOURHOOD_BUFFERS):
        for name in BANK_NEIGHBOURHOOD_BUFFERS:  # sized by the saved bank
            setattr(scorer, name, torch.zeros_like(weights[name]))
    else:  # saved before latent_lof: the bank's neighbourhoods follow from the bank itself
        scorer.set_bank_neighbourhoods()
        weights.update({name: getattr(scorer, name) for name in BANK_NEIGHBOURHOOD_BUFFERS})
    if not all(name in weights for name in CODE_DISTRIBUTION_BUFFERS):
        # saved before latent_mahalanobis: the codes' distribution follows from the bank
        scorer.set_code_distribution()
        weights.update({name: getattr(scorer, name) for name in CODE_DISTRIBUTION_BUFFERS})
    for name in MISSING_BUFFERS:
        if name in weights:  # sized by the saved model; empty in models saved before them
            setattr(scorer, name, torch.zeros_like(weights[name]))
        else:
            weights[name] = getattr(scorer, name)
    try:
        scorer.load_state_dict(weights, strict=True)
    except RuntimeError as err:  # tensors of other shapes than the configuration says
        raise ValueError(f"{directory}: the weights do not fit the saved network "
                         f"configuration: {err}") from None
    # saved before latent_fused or latent_mahalanobis
    if scorer.fusion_center.shape[0] < len(STANDARDISED_RULES):
        scorer.standardise_added_rules()
    return scorer.eval()
