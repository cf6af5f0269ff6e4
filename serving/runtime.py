"""OnnxDetector: the estimator's scoring API on ONNX Runtime, without torch.

Imports numpy, onnx (to verify the file), onnxruntime and the pure-numpy
`anomaly._rules`; never torch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import onnx.utils
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from anomaly._rules import accepted_sample_shapes, check_missing
from serving import metadata

logger = logging.getLogger(__name__)

PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
ATTRIBUTION_OUTPUT = "feature_scores"


def _cuda_driver_present() -> bool:
    """Whether the NVIDIA driver library loads; without it onnxruntime-gpu would try CUDA,
    print an error and fall back to the CPU on every session."""
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def default_providers() -> list[str]:
    available = set(ort.get_available_providers())
    if "CUDAExecutionProvider" in available and not _cuda_driver_present():
        available.discard("CUDAExecutionProvider")
    return [p for p in PREFERRED_PROVIDERS if p in available] or ["CPUExecutionProvider"]


def _verified_model(raw: bytes, source: str) -> tuple[onnx.ModelProto, dict[str, str]]:
    try:
        model = onnx.load_model_from_string(raw)
    except (DecodeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{source} is not a valid ONNX model (truncated or corrupted?): "
                         f"{err}") from err
    props = metadata.unprefixed(model.metadata_props)
    missing = [k for k in metadata.KEYS if k not in props]
    if missing:
        raise ValueError(f"{source} was not exported by this package (metadata {missing} "
                         "missing); export it with `divtri export` or detector.to_onnx()")
    if props["format_version"] not in {str(v) for v in metadata.READABLE_VERSIONS}:
        raise ValueError(f"{source} has format version {props['format_version']}; this "
                         f"runtime reads versions {metadata.READABLE_VERSIONS}")
    if props["graph"] != "scorer":
        raise ValueError(f"{source} holds the {props['graph']!r} graph; OnnxDetector needs "
                         "the fused 'scorer' graph")
    digest = metadata.weights_sha256((init.name, numpy_helper.to_array(init).tobytes())
                                     for init in model.graph.initializer)
    if digest != props["weights_sha256"]:
        raise ValueError(f"{source}: the weights do not match the checksum in its metadata; "
                         "the file was modified after export")
    # Format 1 covered the weights only; format 2 covers every node and metadata entry.
    if props["format_version"] != "1" and props.get("sha256") != metadata.model_sha256(
            model.graph.SerializeToString(deterministic=True), props):
        raise ValueError(f"{source}: the graph or its metadata do not match the checksum in "
                         "its metadata; the file was modified after export")
    return model, props


def check_feature_names(columns, expected: tuple[str, ...] | None, owner: str) -> None:
    """scikit-learn's rule: a table whose column names differ from those seen in ``fit``
    (other names, or the same in another order) is refused, not scored by position."""
    if expected is None or not all(isinstance(c, str) for c in columns):
        return  # as in scikit-learn, names that are not all strings are no names
    names = tuple(columns)
    if names == expected:
        return
    unseen = [n for n in names if n not in expected]
    missing = [n for n in expected if n not in names]
    detail = (f"unseen at fit time: {unseen}; " if unseen else "") + \
        (f"seen at fit time, missing now: {missing}" if missing else "")
    raise ValueError(f"The feature names should match those that were passed during fit to "
                     f"{owner}: {detail or 'same names in another order'}; expected "
                     f"{list(expected)}")


def validate_rows(X, n_features: int, sample_shapes: tuple[tuple[int, ...], ...],
                  owner: str = "OnnxDetector",
                  feature_names: tuple[str, ...] | None = None,
                  allow_missing: bool = False) -> np.ndarray:
    """``X`` as float64 rows ``(n, n_features)``, with the estimator's clear errors; NaN (and
    None in an object array or a DataFrame) is a missing entry, refused unless
    ``allow_missing``, and then refused in a row that has no other entry."""
    if type(X).__module__.startswith("scipy.sparse"):
        raise TypeError("Sparse data was passed for X, but dense data is required. Use "
                        "'.toarray()' to convert to a dense numpy array.")
    if hasattr(X, "columns") and hasattr(X, "to_numpy"):
        check_feature_names(X.columns, feature_names, owner)
    if hasattr(X, "to_numpy"):
        X = X.to_numpy()
    arr = np.asarray(X)
    if arr.dtype.kind == "c":
        raise ValueError("Complex data not supported; pass real numbers")
    if arr.dtype == object:
        # None is how JSON null and pandas' missing objects arrive: a missing entry
        is_none = np.frompyfunc(lambda value: value is None, 1, 1)(arr).astype(bool)
        arr = np.where(is_none, np.nan, arr)
    if arr.dtype.kind not in "biuf":
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"X must be numeric; could not convert it to float: {err}"
                             ) from None
    if arr.ndim < 2:
        raise ValueError(f"Expected 2D array, got {arr.ndim}D array instead; reshape a single "
                         "sample with X.reshape(1, -1)")
    if arr.ndim > 2:
        if tuple(arr.shape[1:]) not in sample_shapes:
            raise ValueError(f"X has samples of shape {tuple(arr.shape[1:])}, but {owner} "
                             f"expects samples of shape {sample_shapes[0]}")
        arr = arr.reshape(arr.shape[0], -1)
    if arr.shape[0] == 0:
        raise ValueError(f"Found array with 0 sample(s) (shape={arr.shape}) while a minimum "
                         "of 1 is required")
    if arr.shape[1] != n_features:
        raise ValueError(f"X has {arr.shape[1]} features, but {owner} is expecting "
                         f"{n_features} features as input")
    rows = arr.astype(np.float64)
    if np.isinf(rows).any():
        raise ValueError("Input X contains infinity")
    check_missing(rows, allow_missing, f"model ({owner} of a detector fitted with "
                  "missing='error')", "impute them, or fit with missing='mask' and export "
                  "again")
    return rows


def conformal_labels(p_value: np.ndarray, alpha: float) -> np.ndarray:
    """+1 inlier / -1 outlier: an outlier where the conformal ``p_value`` is at most
    ``alpha``."""
    return np.where(p_value <= alpha, -1, 1).astype(np.int64)


def check_alpha(alpha) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating)) \
            or not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha must be a float in (0, 1), got {alpha!r}")


DEFAULT_CHUNK_ROWS = 65536
# Float64 row-to-code distances one chunk may hold (256 MiB) for the bank score rules.
MAX_DISTANCES = 2**25


class OnnxDetector:
    """Score with an exported model on ONNX Runtime (GPU when available, else CPU).

    Parameters
    ----------
    path : path-like
        A fused scorer exported by ``LatentEBMDetector.to_onnx`` or ``divtri export``.
    providers : list of str, optional
        ONNX Runtime execution providers in order of preference; default CUDA then CPU,
        among those this onnxruntime build offers.
    chunk_rows : int or None, default=None
        Rows per ``session.run`` call, so memory stays bounded on large inputs; None = 65536,
        or fewer for models whose rule searches a code bank for nearest codes or that are
        calibrated, so that a chunk's distances to the bank and comparisons with the
        calibration scores stay below ``MAX_DISTANCES`` values.

    Attributes
    ----------
    providers_ : list of str
        The providers the session actually got (onnxruntime-gpu silently falls back to the
        CPU where no usable GPU is found).
    offset_, n_features_in_, input_shape_, score_rule_, metadata_
    allows_missing_ : bool
        Whether rows may hold missing entries (NaN): the model was fitted with
        ``missing="mask"``.
    feature_names_in_ : ndarray of str
        Only for a model fitted on a DataFrame: its column names; a DataFrame with other
        columns, or the same in another order, is refused.
    """

    def __init__(self, path, providers=None, chunk_rows: int | None = None) -> None:
        self.path = Path(path)
        raw = self.path.read_bytes()
        model, self.metadata_ = _verified_model(raw, str(self.path))
        self._providers = list(providers) if providers is not None else default_providers()
        outputs = [o.name for o in model.graph.output]
        self._attribution_raw = None
        if ATTRIBUTION_OUTPUT in outputs:
            # ONNX Runtime runs every node of a graph whatever outputs are asked for, so the
            # scores come from a copy of the graph without the attribution's extra passes.
            self._attribution_raw = raw
            scores_only = onnx.utils.Extractor(model).extract_model(
                ["x"], [name for name in outputs if name != ATTRIBUTION_OUTPUT])
            raw = scores_only.SerializeToString()
        self._attribution_session = None
        self.session_ = self._session(raw)
        self.providers_ = self.session_.get_providers()
        logger.info("ONNX Runtime providers: %s", self.providers_)
        self.n_calibration_ = int(self.metadata_.get("calibration_rows", "0"))
        if chunk_rows is None:
            # files exported before "neighbour_rows" count their whole bank
            compared = self.metadata_.get("neighbour_rows",
                                          self.metadata_.get("code_bank_rows", "0"))
            per_row = max(int(compared) + self.n_calibration_, 1)
            chunk_rows = min(DEFAULT_CHUNK_ROWS, max(1, MAX_DISTANCES // per_row))
        if int(chunk_rows) < 1:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
        self.chunk_rows = int(chunk_rows)
        self.n_features_in_ = int(self.metadata_["n_features"])
        self.input_shape_ = tuple(json.loads(self.metadata_["input_shape"]))
        sample_shape = tuple(json.loads(self.metadata_["sample_shape"]))
        self._sample_shapes = accepted_sample_shapes(sample_shape, self.input_shape_)
        self.offset_ = float(self.metadata_["offset"])
        # models exported before missing values were allowed refuse them
        self.allows_missing_ = self.metadata_.get("allows_missing") == "true"
        self.score_rule_ = self.metadata_["score_rule"]
        self._feature_names = None
        if "feature_names" in self.metadata_:
            self._feature_names = tuple(json.loads(self.metadata_["feature_names"]))
            self.feature_names_in_ = np.array(self._feature_names, dtype=object)

    def _session(self, raw: bytes) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # the CUDA-to-CPU fallback is reported in providers_
        return ort.InferenceSession(raw, sess_options=options, providers=self._providers)

    def _run(self, X, attribution: bool = False) -> list[np.ndarray]:
        """score, decision, label, p_value and, with ``attribution``, feature_scores."""
        rows = validate_rows(X, self.n_features_in_, self._sample_shapes,
                             feature_names=self._feature_names,
                             allow_missing=self.allows_missing_)
        session = self.session_
        if attribution:
            if self._attribution_raw is None:
                raise ValueError("this model was exported before feature_scores existed; "
                                 "export it again with this version to get them")
            if self._attribution_session is None:
                self._attribution_session = self._session(self._attribution_raw)
            session = self._attribution_session
        parts = [session.run(None, {"x": rows[i:i + self.chunk_rows]})
                 for i in range(0, len(rows), self.chunk_rows)]
        columns = [np.concatenate(column) for column in zip(*parts, strict=True)]
        if len(columns) == 3:  # exported before p-values existed
            columns.append(np.full(len(rows), np.nan))
        return columns

    def feature_scores(self, X) -> np.ndarray:
        """Each feature's part of the anomaly score, as
        ``LatentEBMDetector.feature_scores``: the shape of ``X``, float64."""
        maps = self._run(X, attribution=True)[4]
        shape = np.shape(X)
        return maps.reshape(shape) if len(shape) > 2 else maps

    def score_samples(self, X) -> np.ndarray:
        """Normality score, higher = more normal; shape (n_samples,), float64."""
        return self._run(X)[0]

    def anomaly_score(self, X) -> np.ndarray:
        """``-score_samples``: higher = more anomalous."""
        return -self.score_samples(X)

    def decision_function(self, X) -> np.ndarray:
        """``score_samples - offset_``; negative = outlier."""
        return self._run(X)[1]

    def predict(self, X, alpha: float | None = None) -> np.ndarray:
        """+1 inlier, -1 outlier: at the exported threshold, or, with ``alpha``, where the
        conformal p-value is at most ``alpha`` (needs a calibrated model)."""
        return self.score_all(X, alpha=alpha)["label"]

    def p_values(self, X) -> np.ndarray:
        """Conformal p-values, as ``LatentEBMDetector.p_values``; needs a calibrated model."""
        self._check_calibrated()
        return self._run(X)[3]

    def _check_calibrated(self) -> None:
        if self.n_calibration_ == 0:
            raise ValueError("this model was exported without calibration scores, so it has "
                             "no p-values: calibrate the detector (calibrate(X_normal) or "
                             "calibration=0.2) and export it again")

    def score_all(self, X, alpha: float | None = None, feature_scores: bool = False
                  ) -> dict[str, np.ndarray]:
        """score_samples, decision, label and p_value from one pass; with ``alpha`` the
        label flags p-values at most ``alpha`` instead of the exported threshold; with
        ``feature_scores`` also each feature's part of the anomaly score, shape
        (n_samples, n_features)."""
        if alpha is not None:
            check_alpha(alpha)
            self._check_calibrated()
        columns = self._run(X, attribution=feature_scores)
        score, decision, label, p_value = columns[:4]
        if alpha is not None:
            label = conformal_labels(p_value, alpha)
        out = {"score_samples": score, "decision": decision, "label": label,
               "p_value": p_value}
        if feature_scores:
            out["feature_scores"] = columns[4]
        return out
