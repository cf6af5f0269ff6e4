"""Bad inputs and faults against every public scoring entry: what each one answers.

Each case feeds one input to the estimator, ``OnnxDetector``, ``divtri score`` (on a file),
the MLflow pyfunc model and the REST server, and records the outcome:

- ``ok``: scores that equal the estimator's on the clean equivalent of the input;
- ``refused``: a clear error (the message is kept);
- ``WRONG``: scores returned for an input that should be refused, scores that differ from
  the estimator's, or a non-finite score labelled an inlier: a defect.

A traceback from inside a library, or a 5xx from the server, is also a defect.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse

COLUMNS = ["temp", "pressure", "flow", "speed"]
ENTRIES = ("estimator", "onnx", "cli", "pyfunc", "rest")


@dataclass(frozen=True)
class Case:
    """One input; ``clean`` is the rows it should score as (None: it must be refused)."""

    name: str
    make: Callable[[pd.DataFrame], object]
    clean: Callable[[pd.DataFrame], pd.DataFrame] | None = None
    # What entries that match columns by name (MLflow's schema: pyfunc and REST) should
    # score, where that differs from ``clean``.
    by_name: Callable[[pd.DataFrame], pd.DataFrame] | None = None


def _set(frame: pd.DataFrame, value, column: str = "flow") -> pd.DataFrame:
    out = frame.astype(object) if isinstance(value, str) or value is None else frame.copy()
    out.loc[out.index[1], column] = value
    return out


def _same(frame):
    return frame


def cases() -> list[Case]:
    """The kinds of input tried (valid ones included: they must score correctly)."""
    return [
        Case("valid DataFrame", _same, _same),
        Case("valid ndarray (no names)", lambda f: f.to_numpy(), _same),
        Case("one row", lambda f: f.iloc[:1], lambda f: f.iloc[:1]),
        Case("int columns", lambda f: f.round().astype(int), lambda f: f.round()),
        Case("float32 columns", lambda f: f.astype(np.float32),
             lambda f: f.astype(np.float32).astype(float)),
        Case("bool column", lambda f: f.assign(flow=f.flow > 0),
             lambda f: f.assign(flow=(f.flow > 0).astype(float))),
        Case("negative zero", lambda f: _set(f, -0.0), lambda f: _set(f, 0.0)),
        Case("subnormal value", lambda f: _set(f, 5e-324), lambda f: _set(f, 5e-324)),
        Case("value 1e40 (beyond float32)", lambda f: _set(f, 1e40), lambda f: _set(f, 1e40)),
        Case("value -1e40", lambda f: _set(f, -1e40), lambda f: _set(f, -1e40)),
        Case("value 1e300", lambda f: _set(f, 1e300), lambda f: _set(f, 1e300)),
        Case("NaN cell", lambda f: _set(f, np.nan)),
        Case("None cell", lambda f: _set(f, None)),
        Case("+inf cell", lambda f: _set(f, np.inf)),
        Case("-inf cell", lambda f: _set(f, -np.inf)),
        Case("text cell", lambda f: _set(f, "high")),
        Case("numeric text cell", lambda f: _set(f, "1.5"), lambda f: _set(f, 1.5)),
        Case("empty text cell", lambda f: _set(f, "")),
        Case("all-text column", lambda f: f.assign(flow="x")),
        Case("complex values", lambda f: f.to_numpy() + 1j),
        Case("no rows", lambda f: f.iloc[:0]),
        Case("one column missing", lambda f: f.drop(columns="flow")),
        Case("one column extra", lambda f: f.assign(extra=1.0), by_name=_same),
        Case("columns reordered", lambda f: f[COLUMNS[::-1]], by_name=_same),
        Case("column renamed", lambda f: f.rename(columns={"flow": "Flow"})),
        Case("duplicated column name", lambda f: f.set_axis(
            ["temp", "pressure", "temp", "speed"], axis=1)),
        # scikit-learn's rule: names that are not all strings are no names; rows by position
        Case("integer column names", lambda f: f.set_axis(range(4), axis=1), _same),
        Case("ndarray, too few columns", lambda f: f.to_numpy()[:, :3]),
        Case("ndarray, too many columns", lambda f: np.hstack([f.to_numpy()] * 2)),
        Case("1-D array", lambda f: f.to_numpy()[0]),
        Case("3-D array", lambda f: f.to_numpy().reshape(len(f), 2, 2)),
        Case("scalar", lambda f: 3.0),
        Case("nested lists (valid)", lambda f: f.to_numpy().tolist(), _same),
        Case("ragged lists", lambda f: [[1.0, 2.0, 3.0, 4.0], [1.0, 2.0]]),
        Case("sparse matrix", lambda f: sparse.csr_matrix(f.to_numpy())),
        Case("object array of floats", lambda f: f.to_numpy().astype(object), _same),
        Case("datetime column", lambda f: f.assign(
            flow=pd.date_range("2024-01-01", periods=len(f)))),
        Case("categorical column", lambda f: f.assign(flow=pd.Categorical(["a"] * len(f)))),
        Case("nullable Float64 with NA", lambda f: _set(f.astype("Float64"), pd.NA)),
        Case("float text column", lambda f: f.assign(flow=f.flow.astype(str)), _same),
    ]


# ---------------------------------------------------------------------------- entry points
def _as_frame(value) -> pd.DataFrame:
    if isinstance(value, pd.DataFrame):
        return value
    arr = np.asarray(value, dtype=object)
    if arr.ndim != 2:
        raise ValueError(f"cannot write a {arr.ndim}-D input to a CSV file")
    return pd.DataFrame(arr)


def _cli_score(model_path: Path, value, work: Path) -> np.ndarray:
    from evaluation import cli

    data = work / "input.csv"
    _as_frame(value).to_csv(data, index=False)
    out = work / "scores.csv"
    out.unlink(missing_ok=True)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["score", str(model_path), str(data), "--out", str(out)])
    if code != 0:
        raise ValueError(stderr.getvalue().strip())
    frame = pd.read_csv(out)
    return frame.score_samples.to_numpy(), frame.label.to_numpy()


def _rest_body(value) -> str:
    frame = _as_frame(value)
    return json.dumps({"dataframe_split": {"columns": [str(c) for c in frame.columns],
                                           "data": frame.astype(object).where(
                                               frame.notna(), None).to_numpy().tolist()}},
                      default=str)


def _post(base: str, body: str, session=None):
    import requests

    return (session or requests).post(f"{base}/invocations", data=body, timeout=60,
                                      headers={"Content-Type": "application/json"})


def _rest_score(base: str, value) -> tuple[np.ndarray, np.ndarray]:
    answer = _post(base, _rest_body(value))
    if answer.status_code >= 500:
        raise RuntimeError(f"HTTP {answer.status_code} (server error)")
    if answer.status_code != 200:
        raise ValueError(f"HTTP {answer.status_code}: {answer.json().get('message', '')}")
    got = pd.DataFrame(answer.json()["predictions"])
    return got.score_samples.to_numpy(dtype=float), got.label.to_numpy()


def _outcome(run: Callable[[], tuple[np.ndarray, np.ndarray]], expected) -> tuple[str, str]:
    """(outcome, detail) of one entry point on one case."""
    from mlflow.exceptions import MlflowException

    try:
        scores, labels = run()
    except (ValueError, TypeError, MlflowException) as err:
        message = " ".join(str(err).split())
        if expected is not None:  # strict, not wrong: no score was given
            return "refused (valid)", message[:150]
        return "refused", message[:150]
    except Exception as err:  # anything else is a defect to report
        return "WRONG", f"{type(err).__name__}: {' '.join(str(err).split())[:150]}"
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels)
    if np.any(np.isnan(scores) & (labels == 1)):
        return "WRONG", "a NaN score labelled an inlier"
    if expected is None:
        return "WRONG", "scored an input that should be refused"
    want_scores, want_labels = expected
    same = scores.shape == want_scores.shape and (
        np.array_equal(scores, want_scores)  # -inf where both overflow
        or np.allclose(scores, want_scores, rtol=1e-5, atol=1e-5))
    if not same:
        return "WRONG", "scores differ from the estimator's on the clean input"
    if not np.array_equal(labels, want_labels):
        return "WRONG", "labels differ from the estimator's on the clean input"
    return "ok", ""


def _mixed_load(base: str, requests_plan: list[tuple[str, np.ndarray | None]], *,
                clients: int, max_seconds: float) -> dict[str, int]:
    """Send the planned (body, expected scores or None = must be refused) requests from
    ``clients`` threads; count what came back."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import requests

    stop_at = time.monotonic() + max_seconds
    shares = [requests_plan[i::clients] for i in range(clients)]

    def client(share):
        counts = {"sent": 0, "5xx": 0, "good_correct": 0, "good_wrong": 0, "bad_4xx": 0,
                  "bad_scored": 0, "failed": 0}
        with requests.Session() as session:
            for body, expected in share:
                if time.monotonic() > stop_at:
                    break
                counts["sent"] += 1
                try:
                    answer = _post(base, body, session)
                except requests.RequestException:
                    counts["failed"] += 1
                    continue
                if answer.status_code >= 500:
                    counts["5xx"] += 1
                elif expected is None:
                    counts["bad_4xx" if 400 <= answer.status_code < 500 else "bad_scored"] += 1
                else:
                    got = (pd.DataFrame(answer.json()["predictions"]).score_samples.to_numpy(
                        dtype=float) if answer.status_code == 200 else None)
                    correct = got is not None and np.allclose(got, expected, rtol=1e-5,
                                                              atol=1e-5)
                    counts["good_correct" if correct else "good_wrong"] += 1
        return counts

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, shares))
    return {key: sum(r[key] for r in results) for key in results[0]}


def robustness_table(*, with_rest: bool = True, epochs: int = 3, load_requests: int = 1000,
                     clients: int = 8, max_seconds: float = 300.0
                     ) -> tuple[pd.DataFrame, dict[str, int] | None]:
    """Fit a small detector on a named 4-column table, expose it through every entry point,
    feed every case to each: one row per (case, entry point). With ``with_rest``, also
    ``load_requests`` REST requests from ``clients`` threads, cycling through the valid
    inputs the server scores and the inputs it must refuse (counts returned)."""
    import mlflow

    from anomaly import LatentEBMDetector
    from evaluation.tracking import throwaway_registry
    from serving.rest import mlflow_server
    from serving.runtime import OnnxDetector

    rng = np.random.RandomState(0)
    train = pd.DataFrame(rng.normal(size=(500, 4)), columns=COLUMNS)
    probe = pd.DataFrame(rng.normal(size=(6, 4)), columns=COLUMNS)
    detector = LatentEBMDetector(epochs=epochs, random_state=0).fit(train)
    rows, load = [], None
    with throwaway_registry(detector, "robustness") as (uri, info, work):
        onnx_path = detector.to_onnx(work / "model.onnx")
        runtime = OnnxDetector(onnx_path)
        pyfunc = mlflow.pyfunc.load_model(info.model_uri)

        def estimator(value):
            return detector.score_samples(value), detector.predict(value)

        def onnx(value):
            out = runtime.score_all(value)
            return out["score_samples"], out["label"]

        def pyfunc_predict(value):
            out = pyfunc.predict(value)
            return out["score_samples"].to_numpy(), out["label"].to_numpy()

        entries = {"estimator": estimator, "onnx": onnx,
                   "cli": lambda value: _cli_score(onnx_path, value, work),
                   "pyfunc": pyfunc_predict}
        with contextlib.ExitStack() as stack:
            if with_rest:
                base = stack.enter_context(mlflow_server("models:/robustness/1",
                                                         tracking_uri=uri))
                entries["rest"] = lambda value: _rest_score(base, value)
            def scored(clean):
                return None if clean is None else (detector.score_samples(clean(probe)),
                                                   detector.predict(clean(probe)))

            for case in cases():
                value = case.make(probe)
                for entry, run in entries.items():
                    named = entry in ("pyfunc", "rest") and case.by_name is not None
                    expected = scored(case.by_name if named else case.clean)
                    outcome, detail = _outcome(lambda run=run, value=value: run(value),
                                               expected)
                    rows.append({"case": case.name, "entry": entry, "outcome": outcome,
                                 "detail": detail})
            if with_rest:
                plan = []
                for case in cases():
                    outcome = rows[[r["case"] for r in rows].index(case.name)
                                   + list(entries).index("rest")]["outcome"]
                    if outcome == "refused (valid)":
                        continue  # MLflow's schema refuses it: neither good nor bad here
                    try:
                        body = _rest_body(case.make(probe))
                    except ValueError:
                        continue  # no JSON table to send (a 1-D or 3-D array)
                    expected = scored(case.by_name or case.clean)
                    plan.append((body, None if expected is None else expected[0]))
                plan = (plan * (load_requests // len(plan) + 1))[:load_requests]
                load = _mixed_load(base, plan, clients=clients, max_seconds=max_seconds)
        mlflow.set_tracking_uri(None)
    return pd.DataFrame(rows), load


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Cases as rows, entry points as columns, each cell the outcome."""
    return table.pivot(index="case", columns="entry", values="outcome").loc[
        list(dict.fromkeys(table.case)), [e for e in ENTRIES if e in set(table.entry)]]
