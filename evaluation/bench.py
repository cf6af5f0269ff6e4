"""``divtri bench``: a table of suites, each a function from the command's options to its
result tables, and one step that writes and prints them.

A suite's function imports what it needs when it runs; this module imports only the
standard library, so that building the command line stays cheap.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation.method_names import ALL_METHODS, DEFAULT_METHODS, DIGITS_METHODS, PYOD_PEERS

IMAGE_DEFAULT_CLASSES = (1, 4, 5, 7, 9)


@dataclass
class Run:
    """One ``divtri bench`` call as a suite sees it: the parsed options, the suite's output
    directory, and the deep models' epochs and parameters (``--budget-minutes`` resolved)."""

    args: argparse.Namespace
    out: Path
    epochs: int | None
    detector_params: dict[str, Any]
    checked: Any = None  # what the suite's input check returned

    def seeds(self, default: Sequence[int]) -> list[int]:
        return list(self.args.seeds) if self.args.seeds is not None else list(default)

    def classes(self, default: Sequence[int]) -> list[int]:
        return list(self.args.classes) if self.args.classes is not None else list(default)

    def data(self, what: str) -> Path:
        """``--data``, or a clear exit saying what this suite needs there."""
        if self.args.data is None:
            raise SystemExit(f"{self.args.suite} needs --data: {what}")
        return Path(self.args.data)

    def options(self, epochs: int | None = None, **extra):
        """The deep methods' settings: ``epochs`` when ``--epochs`` was not given."""
        from evaluation.methods import MethodOptions

        return MethodOptions(epochs=self.epochs if self.epochs is not None else epochs,
                             detector_params=self.detector_params, **extra)


@dataclass
class Report:
    """What a suite hands back: every table is written to the output directory (CSV and
    Markdown); ``shown`` are printed (None: all), then ``notes``."""

    tables: dict[str, Any]
    results: Path | None = None  # the raw, resumable results file
    shown: Sequence[str] | None = None
    digits: int = 3
    notes: Sequence[str] = field(default_factory=tuple)


@dataclass(frozen=True)
class Suite:
    run: Callable[[Run], Report]
    summary: str
    data: str = ""  # what --data holds for this suite; "" = not used
    # Reads and checks the user's inputs before anything is written; its result is Run.checked.
    check: Callable[[argparse.Namespace], Any] | None = None


def run_bench(args: argparse.Namespace) -> int:
    from evaluation.results import markdown, write_tables

    suite = SUITES[args.suite]
    checked = suite.check(args) if suite.check is not None else None
    epochs, params = args.epochs, dict(args.detector_params)
    if args.budget_minutes is not None:
        params["max_training_seconds"] = 60.0 * args.budget_minutes
        epochs = epochs if epochs is not None else 1000
    out = Path(args.out) / args.suite
    out.mkdir(parents=True, exist_ok=True)
    report = suite.run(Run(args, out, epochs, params, checked))
    write_tables(report.tables, out, keep=report.results)
    if report.results is not None:
        print(f"results: {report.results}")
    for name in report.shown if report.shown is not None else report.tables:
        print(f"\n{name}\n{markdown(report.tables[name], digits=report.digits)}")
    for note in report.notes:
        print("\n" + note)
    return 0


def data_help() -> str:
    return "; ".join(f"{name}: {suite.data}" for name, suite in SUITES.items() if suite.data)


def suites_help() -> str:
    return "; ".join(f"{name}: {suite.summary}" for name, suite in SUITES.items())


# ---------------------------------------------------------------- result tables


def _paired_tables(frame) -> dict:
    """The triangle against every other method, run by run, when it took part."""
    from evaluation.results import paired

    if "triangle" not in set(frame["method"]):
        return {}
    return {f"paired_{metric}": paired(frame, "triangle", metric) for metric in ("auroc", "auprc")}


def _held_out_report(log) -> Report:
    from evaluation.results import per_target, summary

    frame = log.frame()
    tables = {"summary": summary(frame), "auroc_per_class": per_target(frame, "auroc"),
              "auprc_per_class": per_target(frame, "auprc"), **_paired_tables(frame)}
    return Report(tables, results=log.path,
                  shown=[n for n in ("summary", "paired_auroc") if n in tables])


def _tables_report(log, notes: Sequence[str] = ()) -> Report:
    from evaluation.results import mean_rank, per_target, summary

    frame = log.frame()
    auroc = per_target(frame, "auroc")
    tables = {"summary": summary(frame).join(mean_rank(auroc)), "auroc_per_dataset": auroc,
              "auprc_per_dataset": per_target(frame, "auprc"), **_paired_tables(frame)}
    return Report(tables, results=log.path,
                  shown=[n for n in ("summary", "paired_auroc") if n in tables], notes=notes)


def _all_methods() -> list[str]:
    """Ours and every peer; PyOD's only where it is installed."""
    from importlib.util import find_spec

    if find_spec("pyod") is None:
        logging.getLogger(__name__).warning(
            "PyOD is not installed: its detectors are left out (pip install "
            "'divtri-anomaly[bench]')")
        return list(DEFAULT_METHODS)
    return list(ALL_METHODS)


# ---------------------------------------------------------------- the suites


def _held_out_digits(run: Run) -> Report:
    from evaluation.suites import digits_suite

    quick = run.args.suite == "quick"
    log = digits_suite(run.out, classes=run.classes(range(10)),
                       seeds=run.seeds([0] if quick else [0, 1, 2]),
                       methods=run.args.methods or list(DIGITS_METHODS),
                       options=run.options(30 if quick else None))
    return _held_out_report(log)


def _images(run: Run, X, y, name: str) -> Report:
    from evaluation import suites
    from evaluation.results import ResultLog

    log = ResultLog(run.out / f"{name}.csv")
    suites.held_out_class_suite(
        X.reshape(len(X), -1), y, dataset=name, classes=run.classes(IMAGE_DEFAULT_CLASSES),
        seeds=run.seeds([0]), methods=run.args.methods or [*DEFAULT_METHODS, *PYOD_PEERS],
        log=log, plot_dir=run.out, options=run.options(image_shape=tuple(X.shape[1:])))
    return _held_out_report(log)


def _mnist(run: Run) -> Report:
    from evaluation import datasets

    X, y = datasets.mnist(run.args.data, download=run.args.download)
    return _images(run, X, y, "mnist")


def _image_set(run: Run) -> Report:
    from evaluation import datasets

    path = run.data("an .npz file with arrays X (images) and y (labels)")
    X, y = datasets.labelled_images(path)
    return _images(run, X, y, path.stem)


def _adbench_files(run: Run, default: Sequence[str] | None = None) -> dict[str, Path]:
    """The ADBench files (name -> path) a suite runs on: ``--datasets``, else those of
    ``default`` that ``--data`` holds, else every file there."""
    from evaluation import datasets

    root = run.data("the directory of ADBench npz files")
    files = datasets.adbench(root)
    names = run.args.datasets or (list(files) if default is None
                                  else [n for n in default if n in files])
    unknown = set(names) - set(files)
    if unknown:
        raise ValueError(f"no ADBench file for {sorted(unknown)} in {root}; the files there "
                         f"are {list(files)}")
    return {n: files[n] for n in names}


def _adbench(run: Run) -> Report:
    from evaluation import datasets, suites
    from evaluation.results import ResultLog

    log = ResultLog(run.out / "adbench.csv")
    suites.tabular_suite(_adbench_files(run), datasets.load_adbench_file,
                         seeds=run.seeds([0, 1, 2]),
                         methods=run.args.methods or [*DEFAULT_METHODS, *PYOD_PEERS],
                         log=log, options=run.options())
    return _tables_report(log)


def _check_tabular(args: argparse.Namespace):
    """The files of the tabular suite, their loader and split options, each file read and
    checked (labels, features, and a split of every seed) before the run starts."""
    from functools import partial

    from evaluation import protocols
    from evaluation.user_data import DataError, labelled_files, load_labelled_table

    if args.data is None:
        raise DataError("the tabular suite needs --data FILE or DIRECTORY "
                        "(.csv, .parquet or .npz)")
    if not 0.0 < args.test_size < 1.0:
        raise DataError(f"--test-size must be between 0 and 1, got {args.test_size}")
    unknown = [name for name in args.methods or () if name not in ALL_METHODS]
    if unknown:
        raise DataError(f"unknown methods {unknown}; choose from {', '.join(ALL_METHODS)}")
    load = partial(load_labelled_table, label_column=args.label_column,
                   anomaly_label=args.anomaly_label, drop_columns=tuple(args.drop_columns))
    split_options = {"test_fraction": args.test_size,
                     "semi_supervised": args.protocol == "semi-supervised"}
    files = labelled_files(args.data)
    for path in files.values():
        X, y = load(path)
        for seed in args.seeds if args.seeds is not None else [0]:
            try:
                split = protocols.tabular(X, y, seed, **split_options)
            except ValueError as err:  # scikit-learn's stratified split
                raise DataError(f"{path}: cannot split {len(y)} rows ({int(y.sum())} "
                                f"anomalies) with --test-size {args.test_size}: {err}"
                                ) from None
            if len(set(split.y_test)) < 2 or len(split.X_train) < 2:
                raise DataError(f"{path}: with --test-size {args.test_size} the split of "
                                f"seed {seed} leaves {len(split.X_train)} training rows and "
                                f"{int(split.y_test.sum())} test anomalies of "
                                f"{len(split.y_test)} test rows; it needs both classes in "
                                "the test rows: add anomalies or change --test-size")
    return files, load, split_options


def _tabular(run: Run) -> Report:
    from evaluation import suites
    from evaluation.results import ResultLog

    files, load, split_options = run.checked
    log = ResultLog(run.out / "tabular.csv")
    suites.tabular_suite(files, load, seeds=run.seeds([0]),
                         methods=run.args.methods or _all_methods(), log=log,
                         options=run.options(), split_options=split_options,
                         plot_dir=run.out, model_dir=run.out / "models")
    return _tables_report(log, notes=[
        f"detector fitted on the first seed, per file: {run.out / 'models'}  (divtri score / "
        "divtri export take it from there)"])


def _reconstruction_and_inpainting(run: Run) -> Report:
    from evaluation import datasets, suites

    X, _ = datasets.mnist(run.args.data, download=run.args.download)
    train, test = X[:datasets.MNIST_TRAIN_ROWS], X[datasets.MNIST_TRAIN_ROWS:]
    recon, inpaint = suites.reconstruction_and_inpainting_suite(
        train, test, low=0.0, high=255.0, seed=run.seeds([0])[0],
        options=run.options(image_shape=tuple(X.shape[1:])), out=run.out)
    return Report({"reconstruction": recon, "inpainting": inpaint}, digits=4)


def _speed(run: Run) -> Report:
    import numpy as np

    from evaluation import datasets, speed

    if run.args.data is not None:
        images = datasets.mnist(run.args.data)[0][:10000]
    else:
        images = np.random.RandomState(0).randint(0, 256, (10000, 28, 28)).astype(np.uint8)
    table = speed.training_throughput(images).set_index("variant")
    scoring = speed.scoring_throughput(images).set_index("dtype")
    return Report({"throughput": table, "scoring": scoring})


def _serving(run: Run) -> Report:
    from evaluation.serving_speed import serving_speed

    root = run.args.data
    timings, end_to_end = serving_speed(root / "adbench" if root else None,
                                        root / "mnist" if root else None)
    return Report({"scoring_speed": timings.set_index("model"),
                   "http_end_to_end": end_to_end.set_index("method")}, digits=2)


def _rest(run: Run) -> Report:
    from evaluation.rest_load import rest_load

    return Report({"rest_load": rest_load().set_index("rows_per_request")}, digits=1)


def _spark(run: Run) -> Report:
    from evaluation.spark_run import spark_run

    return Report({"spark": spark_run().set_index("rows")}, digits=6)


def _scale(run: Run) -> Report:
    from evaluation.results import ResultLog
    from evaluation.scale import scoring_memory

    log = ResultLog(run.out / "scores.csv")
    table = scoring_memory(log, run.args.rows or (1_000_000, 3_000_000, 10_000_000))
    return Report({"scoring_memory": table.set_index(["rows", "mode"])}, results=log.path,
                  digits=1)


def _distributed(run: Run) -> Report:
    from evaluation import datasets
    from evaluation.distributed import (
        first_step_table,
        throughput_table,
        torch_distributor_table,
    )
    from evaluation.protocols import tabular

    files = datasets.adbench(run.data("the directory of ADBench npz files"))
    name = (run.args.datasets or ["shuttle"])[0]
    X, y = datasets.load_adbench_file(files[name])
    epochs = run.epochs if run.epochs is not None else 10
    return Report({
        "first_step": first_step_table(),
        "throughput": throughput_table(tabular(X, y, 0).X_train, epochs=epochs),
        "torch_distributor": torch_distributor_table(name, X, y, epochs=epochs),
    }, digits=4)


def _scale_fit(run: Run) -> Report:
    from evaluation.results import ResultLog
    from evaluation.scale import training_memory

    budget = run.args.budget_minutes
    log = ResultLog(run.out / "fits.csv")
    table = training_memory(log, run.args.rows or (1_000_000, 3_000_000, 10_000_000),
                            training_seconds=60.0 if budget is None else 60.0 * budget)
    return Report({"training_memory": table.set_index(["rows", "mode"])}, results=log.path,
                  digits=1)


def _robustness(run: Run) -> Report:
    import pandas as pd

    from evaluation.robustness import robustness_table, summary

    table, load = robustness_table()
    table.to_csv(run.out / "robustness.csv", index=False)
    tables = {"outcomes": summary(table)}
    notes = [", ".join(f"{k}: {v}" for k, v in table.outcome.value_counts().items())]
    if load is not None:
        tables["rest_mixed_load"] = pd.DataFrame([load])
        notes.append("REST, 8 clients, mixed good and bad payloads: "
                     + ", ".join(f"{k} {v}" for k, v in load.items()))
    return Report(tables, results=run.out / "robustness.csv", shown=["outcomes"], notes=notes)


def _calibration(run: Run) -> Report:
    from evaluation.calibration import (
        adbench_splits,
        calibration_suite,
        calibration_summary,
        digits_splits,
    )
    from evaluation.results import ResultLog

    log = ResultLog(run.out / "calibration.csv")
    splits = digits_splits(run.classes(range(10)))
    if run.args.data is not None:
        splits |= adbench_splits(run.args.data)
    calibration_suite(splits, seeds=run.seeds([0, 1, 2]), log=log, epochs=run.epochs,
                      detector_params=run.detector_params)
    return Report({"summary": calibration_summary(log.frame())}, results=log.path)


def _localisation(run: Run) -> Report:
    from evaluation.localisation import localisation_suite, localisation_tables
    from evaluation.results import ResultLog

    root = run.data("a directory with mnist/ and/or adbench/ (the shared data root)")
    log = ResultLog(run.out / "localisation.csv")
    image_params = dict(run.detector_params)
    if run.epochs is None:  # 100 epochs of 60,000 images would take hours on a CPU
        image_params["max_training_seconds"] = 120.0
    localisation_suite(root, log, seeds=run.seeds([0]),
                       epochs=run.epochs if run.epochs is not None else 30,
                       image_epochs=run.epochs if run.epochs is not None else 1000,
                       detector_params=run.detector_params, image_params=image_params,
                       datasets_wanted=run.args.datasets, plot_dir=run.out)
    return Report(localisation_tables(log.frame()), results=log.path)


def _missing(run: Run) -> Report:
    from evaluation import missing
    from evaluation.results import ResultLog

    log = ResultLog(run.out / "missing.csv")
    missing.missing_suite(_adbench_files(run, missing.DEFAULT_SETS),
                          seeds=run.seeds([0, 1, 2]), log=log, options=run.options(30))
    return Report(missing.missing_tables(log.frame()), results=log.path)


def _missing_alarms(run: Run) -> Report:
    from evaluation import missing, protocols
    from evaluation.results import ResultLog

    log = ResultLog(run.out / "false_alarms.csv")
    missing.false_alarm_suite(classes=run.classes(range(10)), seeds=run.seeds([0]),
                              epochs=run.epochs if run.epochs is not None else 30,
                              split_seeds=run.args.split_seeds or
                              [protocols.DEFAULT_SHUFFLE_SEED],
                              detector_params=run.detector_params, log=log)
    return Report({"false_alarm_rates": missing.false_alarm_table(log.frame())},
                  results=log.path)


def _missing_images(run: Run) -> Report:
    from evaluation import datasets, missing
    from evaluation.masks import MASKS
    from evaluation.results import ResultLog

    images = datasets.mnist(run.data("the MNIST npz directory"))[0][:missing.IMAGE_ROWS]
    log = ResultLog(run.out / "incomplete_images.csv")
    missing.incomplete_images_suite(images, masks=MASKS, seed=run.seeds([0])[0],
                                    epochs=run.epochs if run.epochs is not None else 5,
                                    log=log, detector_params=run.detector_params)
    return Report({"recovery_error": missing.incomplete_images_table(log.frame())},
                  results=log.path, digits=4)


def _energy_landscape(run: Run) -> Report:
    from evaluation import datasets, energy_landscape
    from evaluation.results import ResultLog

    log = ResultLog(run.out / "landscape_runs.csv")
    energy_landscape.landscape_suite(_adbench_files(run), datasets.load_adbench_file,
                                     seeds=run.seeds([0]), log=log, options=run.options(30))
    return Report({"energy_landscape": energy_landscape.landscape_table(log.frame())},
                  results=log.path, digits=2)


SUITES: dict[str, Suite] = {
    "quick": Suite(_held_out_digits, "load_digits, all digits, 1 seed, 30 epochs (a few "
                   "minutes)"),
    "digits": Suite(_held_out_digits, "the same protocol, 3 seeds, default epochs"),
    "mnist": Suite(_mnist, "held-out class on MNIST", "the MNIST npz directory (torchvision "
                   "downloads it with --download if omitted)"),
    "images": Suite(_image_set, "held-out class on an image set of yours",
                    "an .npz file with X (images) and y (labels)"),
    "adbench": Suite(_adbench, "the tabular ADBench protocol",
                     "the directory of ADBench npz files"),
    "tabular": Suite(_tabular, "the same protocol on your own labelled CSV, parquet or npz "
                     "file(s) (--label-column)", "a .csv, .parquet or .npz file or a "
                     "directory of them", check=_check_tabular),
    "reconstruction": Suite(_reconstruction_and_inpainting, "reconstruction and inpainting "
                            "error on MNIST test images", "the MNIST npz directory"),
    "inpainting": Suite(_reconstruction_and_inpainting, "the same as reconstruction",
                        "the MNIST npz directory"),
    "speed": Suite(_speed, "training throughput, triangle vs VAE, MNIST-sized images",
                   "the MNIST npz directory (random images if omitted)"),
    "serving": Suite(_serving, "CPU scoring, torch vs ONNX Runtime",
                     "the shared data root with mnist/ and adbench/ (random data if "
                     "omitted)"),
    "rest": Suite(_rest, "load test of the MLflow REST server on 127.0.0.1"),
    "spark": Suite(_spark, "score 500k rows through spark_udf in local mode"),
    "scale": Suite(_scale, "peak memory and time of divtri score on synthetic parquet files "
                   "of --rows rows (default 1M, 3M, 10M) x 16 features, streamed against "
                   "held in memory"),
    "distributed": Suite(_distributed, "data-parallel training: 2 torchrun processes "
                         "against 1 (first step, samples per second) and a TorchDistributor "
                         "fit against single-process ones (AUROC) on one ADBench set "
                         "(--datasets, default shuttle)", "the directory of ADBench npz files"),
    "scale-fit": Suite(_scale_fit, "peak memory and time of divtri fit on synthetic "
                       "parquet files of --rows rows (default 1M, 3M, 10M) x 16 features, "
                       "--stream against read whole (60 s of training each, or "
                       "--budget-minutes)"),
    "robustness": Suite(_robustness, "40 kinds of bad input against the estimator, ONNX, "
                        "divtri score, the pyfunc model and the REST server, plus a mixed "
                        "good/bad REST load"),
    "calibration": Suite(_calibration, "false-alarm rate of conformal p-values at alpha "
                         "0.01/0.05/0.1 on load_digits (and ADBench with --data)",
                         "the ADBench directory (optional)"),
    "localisation": Suite(_localisation, "do feature_scores find an implanted anomaly (a "
                          "patch in MNIST digits, a shifted feature in ADBench rows)?",
                          "the shared data root with mnist/ and adbench/"),
    "missing": Suite(_missing, "ADBench tables with 10/30/50%% of cells removed at random or "
                     "whole feature groups missing, the detector with missing='mask' against "
                     "itself and the peers behind imputers", "the ADBench directory"),
    "missing-alarms": Suite(_missing_alarms, "false-alarm rate on normal load_digits rows by "
                            "missing rate, estimator and ONNX"),
    "energy-landscape": Suite(_energy_landscape, "where the critic's score E(x, mu(x)) is "
                              "lowest: cold Langevin descent from noise against the training "
                              "rows, per ADBench set", "the directory of ADBench npz files"),
    "missing-images": Suite(_missing_images, "learning from incomplete MNIST training images "
                            "(the paper's masks), recovery error against imputers",
                            "the MNIST npz directory"),
}
