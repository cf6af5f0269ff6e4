"""The ``divtri`` command line.

``divtri bench``   run a benchmark suite and write tables;
``divtri fit``     data file -> saved detector (optionally logged to MLflow);
``divtri export``  saved detector -> .onnx;
``divtri score``   .onnx or saved detector + data file -> CSV of scores and labels.

Commands import what they need when they run, so ``divtri score model.onnx`` never loads torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

SUITES = ("quick", "digits", "mnist", "images", "adbench", "tabular", "reconstruction",
          "inpainting", "speed", "serving", "rest", "spark", "robustness", "calibration",
          "localisation", "missing", "missing-alarms", "missing-images")
IMAGE_DEFAULT_CLASSES = (1, 4, 5, 7, 9)
DEFAULT_METHODS = ("triangle", "vae_ablation", "isolation_forest", "lof", "ocsvm")
# On load_digits a plain nearest-neighbour score in pixel space is the strongest peer.
DIGITS_METHODS = (*DEFAULT_METHODS, "pyod_knn")
PYOD_METHODS = ("pyod_knn", "pyod_ecod", "pyod_copod", "pyod_hbos", "pyod_pca", "pyod_vae")


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}"
                                         ) from None


def _json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}: {err}"
                                         ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="divtri", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0)
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="run a benchmark suite and write tables")
    bench.add_argument("--suite", choices=SUITES, default="quick",
                       help="quick: load_digits, all digits, 1 seed, 30 epochs (a few minutes); "
                            "digits: the same protocol, 3 seeds, default epochs; "
                            "mnist / images: held-out class on MNIST / an npz image set; "
                            "adbench: the tabular ADBench protocol; "
                            "tabular: the same protocol on your own labelled CSV, parquet or "
                            "npz file(s) (--data, --label-column); "
                            "reconstruction, inpainting: MNIST test images; "
                            "speed: training throughput, triangle vs VAE, MNIST-sized images; "
                            "serving: CPU scoring, torch vs ONNX Runtime; "
                            "rest: load test of the MLflow REST server on 127.0.0.1; "
                            "spark: score 500k rows through spark_udf in local mode; "
                            "robustness: 40 kinds of bad input against the estimator, ONNX, "
                            "divtri score, the pyfunc model and the REST server, plus a "
                            "mixed good/bad REST load; "
                            "calibration: false-alarm rate of conformal p-values at alpha "
                            "0.01/0.05/0.1 on load_digits (and ADBench with --data); "
                            "localisation: do feature_scores find an implanted anomaly (a "
                            "patch in MNIST digits, a shifted feature in ADBench rows)? "
                            "--data is the shared data root with mnist/ and adbench/; "
                            "missing: ADBench tables with 10/30/50%% of cells removed at "
                            "random or whole feature groups missing, the detector with "
                            "missing='mask' against itself and the peers behind imputers "
                            "(--data: the ADBench directory); "
                            "missing-alarms: false-alarm rate on normal load_digits rows "
                            "by missing rate, estimator and ONNX; "
                            "missing-images: learning from incomplete MNIST training images "
                            "(the paper's masks), recovery error against imputers (--data: "
                            "the MNIST directory)")
    bench.add_argument("--data", type=Path, default=None,
                       help="data directory: speed takes the MNIST npz directory, serving "
                            "the shared data root (with mnist/ and adbench/); random data if "
                            "omitted; tabular takes a .csv, .parquet or .npz file or a "
                            "directory of them")
    bench.add_argument("--classes", "--digits", dest="classes", type=_ints, default=None,
                       help="held-out classes, e.g. 1,4,7 (default: all digits for digits, "
                            "1,4,5,7,9 for image sets)")
    bench.add_argument("--datasets", type=_names, default=None,
                       help="adbench: dataset names, e.g. glass,wine (default: every file)")
    bench.add_argument("--download", action="store_true",
                       help="mnist without --data: let torchvision download MNIST")
    bench.add_argument("--budget-minutes", type=float, default=None,
                       help="training time budget per deep model (epochs then default to "
                            "1000, so the budget decides)")
    bench.add_argument("--seeds", type=_ints, default=None, help="e.g. 0,1,2")
    bench.add_argument("--epochs", type=int, default=None, help="epochs of the deep methods")
    bench.add_argument("--methods", type=_names, default=None,
                       help=f"comma-separated; default {','.join(DEFAULT_METHODS)}, plus "
                            "pyod_knn for quick and digits and "
                            f"{','.join(PYOD_METHODS)} for mnist, images and adbench")
    bench.add_argument("--detector-params", type=_json_object, default={},
                       help="JSON object of LatentEBMDetector parameters for our two models, "
                            "e.g. '{\"latent_dim\": 4, \"score_rule\": \"joint\"}' (a lever "
                            "to screen); use a separate --out for each setting")
    bench.add_argument("--label-column", default=None,
                       help="tabular: the column of labels in CSV / parquet files (npz files "
                            "use their X and y arrays)")
    bench.add_argument("--anomaly-label", default=None,
                       help="tabular: the label value that marks an anomaly, when labels are "
                            "not 0/1 (e.g. fraud)")
    bench.add_argument("--drop-columns", type=_names, default=[],
                       help="tabular: comma-separated columns that are not features (ids, "
                            "text)")
    bench.add_argument("--protocol", choices=("unsupervised", "semi-supervised"),
                       default="unsupervised",
                       help="tabular: fit on all training rows, anomalies included "
                            "(unsupervised, ADBench's protocol) or on the normal training "
                            "rows only (semi-supervised); the test rows are the same")
    bench.add_argument("--test-size", type=float, default=0.3,
                       help="tabular: share of the rows held out for testing (stratified)")
    bench.add_argument("--out", type=Path, default=Path("results"),
                       help="output directory (CSV and Markdown); reruns resume from it")
    bench.add_argument("--mlflow-experiment", default=None,
                       help="also log the run to this MLflow experiment (tracking server "
                            "from MLFLOW_TRACKING_URI): the options, every number of the "
                            "tables (AUROC, AUPRC, false-alarm rates, ...) and the files")

    fit = commands.add_parser("fit", help="fit a detector on a data file and save it")
    fit.add_argument("data", type=Path, help=".npy, .npz, .csv or .parquet of normal samples "
                                             "(rows, or images (n, H, W))")
    fit.add_argument("--out", type=Path, required=True,
                     help="model directory to write (as detector.save(); then divtri export "
                          "or divtri score)")
    fit.add_argument("--drop-columns", type=_names, default=[],
                     help="comma-separated columns of a table that are not features")
    fit.add_argument("--objective", choices=("triangle", "vae"), default=None)
    fit.add_argument("--score-rule", default=None, help="auto (default), fused, latent_knn, "
                                                        "joint, reconstruction, energy, elbo")
    fit.add_argument("--epochs", type=int, default=None)
    fit.add_argument("--max-training-minutes", type=float, default=None,
                     help="stop training after this many minutes")
    fit.add_argument("--image-shape", type=_ints, default=None,
                     help="for flat rows that are images, e.g. 28,28 or 3,32,32")
    fit.add_argument("--latent-dim", type=int, default=None)
    fit.add_argument("--calibration", type=float, default=None,
                     help="fraction of rows held out to calibrate p-values, e.g. 0.2")
    fit.add_argument("--alpha", type=float, default=None,
                     help="flag p-values at most ALPHA (with --calibration)")
    fit.add_argument("--contamination", default=None, help="auto or a fraction in (0, 0.5]")
    fit.add_argument("--missing", choices=("error", "mask"), default=None,
                     help="mask: learn with empty cells / NaN left out, and let the saved "
                          "and exported model score rows with missing entries (default: "
                          "error, refuse them)")
    fit.add_argument("--random-state", type=int, default=None)
    fit.add_argument("--params", type=_json_object, default={},
                     help="JSON object of any other LatentEBMDetector parameters")
    fit.add_argument("--checkpoint-dir", type=Path, default=None,
                     help="write training checkpoints here; with --resume, continue from them")
    fit.add_argument("--resume", action="store_true")
    fit.add_argument("--mlflow-experiment", default=None,
                     help="log the fit (parameters, per-epoch metrics, the ONNX-backed "
                          "model) to this MLflow experiment")
    fit.add_argument("--register", default=None,
                     help="also register the logged model under this name")

    export = commands.add_parser("export", help="export a saved detector to ONNX")
    export.add_argument("model", type=Path, help="directory written by detector.save()")
    export.add_argument("out", type=Path, help="output .onnx file")
    export.add_argument("--graph", choices=("scorer", "encoder", "energy"), default="scorer")

    score = commands.add_parser("score", help="score a data file, write a CSV")
    score.add_argument("model", type=Path, help=".onnx file or saved detector directory")
    score.add_argument("data", type=Path, help=".npy, .npz, .csv or .parquet")
    score.add_argument("--out", type=Path, default=Path("scores.csv"))
    score.add_argument("--alpha", type=float, default=None,
                       help="flag rows whose conformal p-value is at most ALPHA (a calibrated "
                            "model) instead of using the saved threshold")
    return parser


def _held_out_report(log, out: Path) -> None:
    from evaluation.results import markdown, per_target, summary, write_tables

    frame = log.frame()
    tables = {"summary": summary(frame), "auroc_per_class": per_target(frame, "auroc"),
              "auprc_per_class": per_target(frame, "auprc"), **_paired_tables(frame)}
    write_tables(tables, out)
    print(f"results: {log.path}\n")
    print(markdown(tables["summary"]))
    if "paired_auroc" in tables:
        print("\n" + markdown(tables["paired_auroc"]))


def _paired_tables(frame) -> dict:
    """The triangle against every other method, run by run, when it took part."""
    from evaluation.results import paired

    if "triangle" not in set(frame["method"]):
        return {}
    return {f"paired_{metric}": paired(frame, "triangle", metric) for metric in ("auroc", "auprc")}


def run_bench(args: argparse.Namespace) -> int:
    import numpy as np
    import pandas as pd

    from evaluation import datasets, speed, suites
    from evaluation.methods import MethodOptions
    from evaluation.results import ResultLog, markdown, write_tables
    from evaluation.suites import digits_suite

    out = Path(args.out) / args.suite
    # Every input problem of the user's own files is found before anything is written.
    tabular_input = _tabular_input(args) if args.suite == "tabular" else None
    out.mkdir(parents=True, exist_ok=True)
    if args.suite == "speed":
        if args.data is not None:
            images = datasets.mnist(args.data)[0][:10000]
        else:
            images = np.random.RandomState(0).randint(0, 256, (10000, 28, 28)).astype(np.uint8)
        table = speed.training_throughput(images)
        scoring = speed.scoring_throughput(images).set_index("dtype")
        write_tables({"throughput": table.set_index("variant"), "scoring": scoring}, out)
        print(markdown(table.set_index("variant")))
        print("\n" + markdown(scoring))
        return 0
    if args.suite == "serving":
        from evaluation.serving_speed import serving_speed

        root = args.data
        timings, end_to_end = serving_speed(root / "adbench" if root else None,
                                            root / "mnist" if root else None)
        write_tables({"scoring_speed": timings.set_index("model"),
                      "http_end_to_end": end_to_end.set_index("method")}, out)
        print(markdown(timings.set_index("model")))
        print()
        print(markdown(end_to_end.set_index("method"), digits=2))
        return 0
    if args.suite == "rest":
        from evaluation.rest_load import rest_load

        table = rest_load()
        write_tables({"rest_load": table.set_index("rows_per_request")}, out)
        print(markdown(table.set_index("rows_per_request"), digits=1))
        return 0
    if args.suite == "robustness":
        from evaluation.robustness import robustness_table
        from evaluation.robustness import summary as outcome_table

        table, load = robustness_table()
        table.to_csv(out / "robustness.csv", index=False)
        grid = outcome_table(table)
        write_tables({"outcomes": grid}, out)
        print(markdown(grid))
        counts = table.outcome.value_counts()
        print("\n" + ", ".join(f"{k}: {v}" for k, v in counts.items()))
        if load is not None:
            write_tables({"rest_mixed_load": pd.DataFrame([load])}, out)
            print("REST, 8 clients, mixed good and bad payloads: " + ", ".join(
                f"{k} {v}" for k, v in load.items()))
        return 0
    if args.suite == "spark":
        from evaluation.spark_run import spark_run

        table = spark_run()
        write_tables({"spark": table.set_index("rows")}, out)
        print(markdown(table.set_index("rows"), digits=6))
        return 0
    epochs = args.epochs
    detector_params = dict(args.detector_params)
    if args.budget_minutes is not None:
        detector_params["max_training_seconds"] = 60.0 * args.budget_minutes
        epochs = epochs if epochs is not None else 1000
    if args.suite == "localisation":
        from evaluation.localisation import localisation_suite, localisation_tables

        if args.data is None:
            raise SystemExit("localisation needs --data: a directory with mnist/ and/or "
                             "adbench/ (the shared data root)")
        log = ResultLog(out / "localisation.csv")
        image_params = dict(detector_params)
        if epochs is None:  # 100 epochs of 60,000 images would take hours on a CPU
            image_params["max_training_seconds"] = 120.0
        localisation_suite(args.data, log, seeds=args.seeds if args.seeds is not None else [0],
                           epochs=epochs if epochs is not None else 30,
                           image_epochs=epochs if epochs is not None else 1000,
                           detector_params=detector_params, image_params=image_params,
                           datasets_wanted=args.datasets, plot_dir=out)
        tables = localisation_tables(log.frame())
        write_tables(tables, out)
        for name, table in tables.items():
            print(f"\n{name}\n{markdown(table)}")
        return 0
    if args.suite in ("missing", "missing-alarms", "missing-images"):
        return _run_missing_suite(args, out, epochs, detector_params)
    if args.suite == "calibration":
        from evaluation.calibration import (
            adbench_splits,
            calibration_suite,
            calibration_summary,
            digits_splits,
        )

        log = ResultLog(out / "calibration.csv")
        splits = digits_splits(args.classes if args.classes is not None else range(10))
        if args.data is not None:
            splits |= adbench_splits(args.data)
        calibration_suite(splits, seeds=args.seeds if args.seeds is not None else [0, 1, 2],
                          log=log, epochs=epochs, detector_params=detector_params)
        table = calibration_summary(log.frame())
        write_tables({"summary": table}, out)  # beside the raw calibration.csv
        print(markdown(table))
        return 0
    if args.suite in ("quick", "digits"):
        quick = args.suite == "quick"
        log = digits_suite(
            out,
            classes=args.classes if args.classes is not None else list(range(10)),
            seeds=args.seeds if args.seeds is not None else ([0] if quick else [0, 1, 2]),
            methods=args.methods or list(DIGITS_METHODS),
            options=MethodOptions(epochs=epochs if epochs is not None else (30 if quick else
                                                                             None),
                                  detector_params=detector_params),
        )
        _held_out_report(log, out)
        return 0
    if tabular_input is not None:
        files, load, split_options = tabular_input
        log = ResultLog(out / "tabular.csv")
        suites.tabular_suite(files, load, seeds=args.seeds if args.seeds is not None else [0],
                             methods=args.methods or _all_methods(), log=log,
                             options=MethodOptions(epochs=epochs,
                                                   detector_params=detector_params),
                             split_options=split_options, plot_dir=out,
                             model_dir=out / "models")
        _tables_report(log, out)
        print(f"\ndetector fitted on the first seed, per file: {out / 'models'}  "
              "(divtri score / divtri export take it from there)")
        return 0
    return _run_data_suite(args, out, epochs, detector_params)


def _run_missing_suite(args: argparse.Namespace, out: Path, epochs, detector_params) -> int:
    from evaluation import datasets, missing
    from evaluation.methods import MethodOptions
    from evaluation.results import ResultLog, markdown, write_tables

    if args.suite == "missing-images":
        from evaluation.masks import MASKS

        if args.data is None:
            raise SystemExit("missing-images needs --data: the MNIST npz directory")
        images = datasets.mnist(args.data)[0][:missing.IMAGE_ROWS]
        log = ResultLog(out / "incomplete_images.csv")
        missing.incomplete_images_suite(images, masks=MASKS,
                                        seed=args.seeds[0] if args.seeds else 0,
                                        epochs=epochs if epochs is not None else 5, log=log,
                                        detector_params=detector_params)
        tables = {"recovery_error": missing.incomplete_images_table(log.frame())}
        write_tables(tables, out)
        print(markdown(tables["recovery_error"], digits=4))
        return 0
    epochs = epochs if epochs is not None else 30
    if args.suite == "missing-alarms":
        log = ResultLog(out / "false_alarms.csv")
        missing.false_alarm_suite(classes=args.classes if args.classes is not None
                                  else list(range(10)),
                                  seeds=args.seeds if args.seeds is not None else [0],
                                  epochs=epochs, detector_params=detector_params, log=log)
        tables = {"false_alarms": missing.false_alarm_table(log.frame())}
    else:
        if args.data is None:
            raise SystemExit("missing needs --data DIRECTORY of ADBench npz files")
        files = datasets.adbench(args.data)
        names = args.datasets or [n for n in missing.DEFAULT_SETS if n in files]
        unknown = set(names) - set(files)
        if unknown:
            raise ValueError(f"no ADBench file for {sorted(unknown)} in {args.data}")
        log = ResultLog(out / "missing.csv")
        missing.missing_suite({n: files[n] for n in names},
                              seeds=args.seeds if args.seeds is not None else [0, 1, 2],
                              log=log, options=MethodOptions(epochs=epochs,
                                                             detector_params=detector_params))
        tables = missing.missing_tables(log.frame())
    write_tables(tables, out)
    print(f"results: {log.path}")
    for name, table in tables.items():
        print(f"\n{name}\n{markdown(table)}")
    return 0


def _all_methods() -> list[str]:
    """Ours and every peer; PyOD's only where it is installed."""
    from importlib.util import find_spec

    from evaluation.methods import OURS, PYOD_PEERS, SKLEARN_PEERS

    if find_spec("pyod") is None:
        logging.getLogger(__name__).warning(
            "PyOD is not installed: its detectors are left out (pip install "
            "'divtri-anomaly[bench]')")
        return [*OURS, *SKLEARN_PEERS]
    return [*OURS, *SKLEARN_PEERS, *PYOD_PEERS]


def _tabular_input(args: argparse.Namespace):
    """The files of the tabular suite, their loader and split options, each file read and
    checked (labels, features, and a split of every seed) before the run starts."""
    from functools import partial

    from evaluation import protocols
    from evaluation.methods import OURS, PYOD_PEERS, SKLEARN_PEERS
    from evaluation.user_data import DataError, labelled_files, load_labelled_table

    if args.data is None:
        raise DataError("the tabular suite needs --data FILE or DIRECTORY "
                        "(.csv, .parquet or .npz)")
    if not 0.0 < args.test_size < 1.0:
        raise DataError(f"--test-size must be between 0 and 1, got {args.test_size}")
    known = (*OURS, *SKLEARN_PEERS, *PYOD_PEERS)
    unknown = [name for name in args.methods or () if name not in known]
    if unknown:
        raise DataError(f"unknown methods {unknown}; choose from {', '.join(known)}")
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


def _tables_report(log, out: Path) -> None:
    from evaluation.results import markdown, mean_rank, per_target, summary, write_tables

    frame = log.frame()
    auroc = per_target(frame, "auroc")
    table = summary(frame).join(mean_rank(auroc))
    tables = {"summary": table, "auroc_per_dataset": auroc,
              "auprc_per_dataset": per_target(frame, "auprc"), **_paired_tables(frame)}
    write_tables(tables, out)
    print(f"results: {log.path}\n")
    print(markdown(table))
    if "paired_auroc" in tables:
        print("\n" + markdown(tables["paired_auroc"]))


def _run_data_suite(args: argparse.Namespace, out: Path, epochs, detector_params) -> int:
    from evaluation import datasets, suites
    from evaluation.methods import MethodOptions
    from evaluation.results import ResultLog, markdown, write_tables

    seeds = args.seeds if args.seeds is not None else [0]
    methods = args.methods or list(DEFAULT_METHODS + PYOD_METHODS)
    if args.suite == "adbench":
        if args.data is None:
            raise SystemExit("adbench needs --data DIRECTORY of ADBench npz files")
        files = datasets.adbench(args.data)
        unknown = set(args.datasets or ()) - set(files)
        if unknown:
            raise ValueError(f"no ADBench file for {sorted(unknown)} in {args.data}; the "
                             f"files there are {list(files)}")
        log = ResultLog(out / "adbench.csv")
        suites.tabular_suite({n: files[n] for n in (args.datasets or files)},
                             datasets.load_adbench_file,
                             seeds=args.seeds if args.seeds is not None else [0, 1, 2],
                             methods=methods, log=log,
                             options=MethodOptions(epochs=epochs,
                                                   detector_params=detector_params))
        _tables_report(log, out)
        return 0
    if args.suite == "images":
        if args.data is None:
            raise SystemExit("images needs --data FILE.npz with X and y")
        X, y = datasets.labelled_images(args.data)
        name = Path(args.data).stem
    else:
        X, y = datasets.mnist(args.data, download=args.download)
        name = "mnist"
    image_shape = tuple(X.shape[1:])
    if args.suite in ("reconstruction", "inpainting"):
        train, test = X[:datasets.MNIST_TRAIN_ROWS], X[datasets.MNIST_TRAIN_ROWS:]
        options = MethodOptions(epochs=epochs, image_shape=image_shape,
                                detector_params=detector_params)
        recon, inpaint = suites.reconstruction_and_inpainting_suite(
            train, test, low=0.0, high=255.0, seed=seeds[0], options=options, out=out)
        write_tables({"reconstruction": recon, "inpainting": inpaint}, out)
        print(markdown(recon, digits=4))
        print()
        print(markdown(inpaint, digits=4))
        return 0
    log = ResultLog(out / f"{name}.csv")
    suites.held_out_class_suite(
        X.reshape(len(X), -1), y, dataset=name,
        classes=args.classes if args.classes is not None else list(IMAGE_DEFAULT_CLASSES),
        seeds=seeds, methods=methods, log=log, plot_dir=out,
        options=MethodOptions(epochs=epochs, image_shape=image_shape,
                              detector_params=detector_params))
    _held_out_report(log, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run_command(args)
    except (ValueError, OSError) as err:
        # A problem with the user's input or files: one line, not a traceback (-v shows it).
        if args.verbose:
            raise
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"divtri {args.command}: error: {message}", file=sys.stderr)
        return 2


def _fit_params(args: argparse.Namespace) -> dict:
    """The estimator's parameters from ``divtri fit``'s options (a progress bar by default)."""
    params = {"verbose": 1, **args.params}
    options = {"objective": args.objective, "score_rule": args.score_rule,
               "epochs": args.epochs, "image_shape": args.image_shape,
               "latent_dim": args.latent_dim, "calibration": args.calibration,
               "alpha": args.alpha, "random_state": args.random_state,
               "missing": args.missing}
    params.update({k: v for k, v in options.items() if v is not None})
    if args.max_training_minutes is not None:
        params["max_training_seconds"] = 60.0 * args.max_training_minutes
        params.setdefault("epochs", 1000)
    if args.contamination is not None:
        params["contamination"] = (args.contamination if args.contamination == "auto"
                                   else float(args.contamination))
    return params


def _run_command(args: argparse.Namespace) -> int:
    if args.command == "bench":
        import time

        started = time.time()
        code = run_bench(args)
        if code == 0 and args.mlflow_experiment:
            from evaluation.tracking import log_bench_run

            run_id = log_bench_run(args.mlflow_experiment, vars(args),
                                   Path(args.out) / args.suite, started)
            print(f"logged to MLflow experiment {args.mlflow_experiment!r}, run {run_id}")
        return code
    if args.command == "fit":
        from serving.commands import fit_command

        detector = fit_command(args.data, args.out, _fit_params(args),
                               drop_columns=args.drop_columns,
                               checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                               mlflow_experiment=args.mlflow_experiment, register=args.register)
        print(f"fitted on {detector.n_features_in_} features, "
              f"{len(detector.training_history_)} epochs -> {args.out}")
        return 0
    if args.command == "export":
        from serving.commands import export_command

        print(export_command(args.model, args.out, args.graph))
        return 0
    from serving.commands import score_command

    n_rows = score_command(args.model, args.data, args.out, alpha=args.alpha)
    print(f"scored {n_rows} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
