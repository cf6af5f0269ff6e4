"""Export a fitted LatentEBMDetector to ONNX: the fused scorer, the encoder and the energy.

Every graph takes raw rows ``(batch, n_features)`` float32 and holds the preprocessing learned
in ``fit``, so a deployed model needs nothing but its .onnx file. The batch axis is dynamic.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper
from torch import nn

from anomaly._rules import outlier_labels, package_version
from serving import metadata
from training import AnomalyScorer
from training.scorer import FLOAT64_BUFFERS, NEIGHBOUR_RULES

GRAPHS = ("scorer", "encoder", "energy")
SCORER_OUTPUTS = ("score_samples", "decision", "label", "p_value", "feature_scores")


class FusedScorer(nn.Module):
    """raw rows -> (score_samples, decision, label, p_value, feature_scores) with ``offset_``
    and the calibration scores inside the graph (p_value is NaN for an uncalibrated model;
    feature_scores has shape (batch, n_features))."""

    def __init__(self, scorer: AnomalyScorer, offset: float) -> None:
        super().__init__()
        self.scorer = scorer
        self.register_buffer("offset", torch.tensor(offset, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        normality = -self.scorer(x)
        # A value beyond float32's range overflows the float32 networks into NaN; such a row
        # is as anomalous as a score can be, never an inlier (NaN < 0 would be False).
        normality = torch.where(torch.isnan(normality),
                                torch.full_like(normality, -torch.inf), normality)
        decision = normality - self.offset
        label = outlier_labels(decision)
        return (normality, decision, label, self.scorer.p_values(-normality),
                self.scorer.feature_scores(x, -normality))


class EncoderGraph(nn.Module):
    """raw rows -> (mu, logvar), float32."""

    def __init__(self, scorer: AnomalyScorer) -> None:
        super().__init__()
        self.scorer = scorer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scorer.encoder(self.scorer.preprocess(x).to(torch.float32))


class EnergyGraph(nn.Module):
    """(raw rows, z float32) -> E(x, z), float32."""

    def __init__(self, scorer: AnomalyScorer) -> None:
        super().__init__()
        self.scorer = scorer

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.scorer.energy(self.scorer.preprocess(x).to(torch.float32), z)


def export_scorer(detector) -> AnomalyScorer:
    """A copy of the fitted scorer as exported: networks in float32 (what GPUs and ONNX
    Runtime's conv kernels want); input, preprocessing, the score's calibration and its sums
    in float64, so that scores agree with the estimator."""
    scorer = copy.deepcopy(detector.scorer_).to(torch.float32).eval()
    for name, buffer in detector.scorer_.named_buffers():
        owner, _, leaf = name.rpartition(".")  # an ensemble's members hold their own
        if leaf in FLOAT64_BUFFERS:
            setattr(scorer.get_submodule(owner), leaf, buffer.clone())
    return scorer


def _graph(detector, graph: str) -> tuple[nn.Module, tuple, tuple[str, ...], tuple[str, ...]]:
    scorer = export_scorer(detector)
    x = torch.zeros(2, detector.n_features_in_, dtype=torch.float64)
    if graph == "scorer":
        return (FusedScorer(scorer, detector.offset_), (x,), ("x",),
                SCORER_OUTPUTS)
    if graph == "encoder":
        return EncoderGraph(scorer), (x,), ("x",), ("mu", "logvar")
    if graph == "energy":
        if scorer.energy is None:
            raise ValueError("the VAE ablation has no energy network to export")
        z = torch.zeros(2, scorer.encoder.mu.out_features, dtype=torch.float32)
        return EnergyGraph(scorer), (x, z), ("x", "z"), ("energy",)
    raise ValueError(f"graph must be one of {GRAPHS}, got {graph!r}")


def export_onnx(detector, path: str | Path, graph: str = "scorer",
                opset_version: int | None = None) -> Path:
    """Write one graph of a fitted detector to ``path`` as a single self-contained .onnx file.

    Parameters
    ----------
    detector : LatentEBMDetector
        Fitted.
    path : path-like
        Output file.
    graph : {"scorer", "encoder", "energy"}
        ``scorer``: x -> score_samples, decision, label, p_value, feature_scores (the
        deployable model);
        ``encoder``: x -> mu, logvar; ``energy``: (x, z) -> E(x, z).

    Returns
    -------
    path : Path
    """
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(detector)
    module, args, input_names, output_names = _graph(detector, graph)
    batch = torch.export.Dim("batch", min=1)
    dynamic = {name: {0: batch} for name in input_names}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic,
                                    input_names=list(input_names),
                                    output_names=list(output_names),
                                    opset_version=opset_version, external_data=False,
                                    verbose=False)
    model = program.model_proto
    contamination = detector.contamination
    props = {
        "format_version": str(metadata.FORMAT_VERSION),
        "package_version": package_version(),
        "graph": graph,
        "n_features": str(detector.n_features_in_),
        "input_shape": json.dumps(list(detector.input_shape_)),
        "sample_shape": json.dumps(list(detector._sample_shape)),
        "score_rule": detector.score_rule_,
        "n_members": str(detector.n_members_),
        "code_bank_rows": str(detector.scorer_.code_bank.shape[0]),
        # codes each scored row is compared with (a rows x codes distance block), which
        # bounds the runtime's chunks: the bank for a nearest-code rule, none otherwise
        "neighbour_rows": str(detector.scorer_.code_bank.shape[0]
                              if detector.score_rule_ in NEIGHBOUR_RULES else 0),
        "calibration_rows": str(detector.scorer_.calibration_scores.shape[0]),
        "offset": repr(float(detector.offset_)),
        "contamination": str(contamination),
        # "true": rows may hold NaN (missing entries), completed inside the graph (IsNaN)
        "allows_missing": "true" if detector.scorer_.allows_missing else "false",
        "weights_sha256": metadata.weights_sha256(
            (init.name, numpy_helper.to_array(init).tobytes())
            for init in model.graph.initializer),
    }
    if hasattr(detector, "feature_names_in_"):
        # the runtime then refuses a DataFrame whose columns differ, as the estimator does
        props["feature_names"] = json.dumps([str(n) for n in detector.feature_names_in_])
    props["sha256"] = metadata.model_sha256(
        model.graph.SerializeToString(deterministic=True), props)
    onnx.helper.set_model_props(model, metadata.prefixed(props))
    onnx.save_model(model, str(path), save_as_external_data=False)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The package's metadata of an exported model, without the prefix."""
    model = onnx.load(str(path), load_external_data=False)
    return metadata.unprefixed(model.metadata_props)
