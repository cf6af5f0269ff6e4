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

from evaluation.bench import SUITES, data_help, run_bench, suites_help
from evaluation.method_names import DEFAULT_METHODS, PYOD_PEERS


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
    bench.add_argument("--suite", choices=list(SUITES), default="quick", help=suites_help())
    bench.add_argument("--data", type=Path, default=None, help=data_help())
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
    bench.add_argument("--split-seeds", type=_ints, default=None,
                       help="missing-alarms: shuffles of the load_digits train/test split "
                            "(default 42), so that the test rows change too; the table "
                            "pools every split in the results file")
    bench.add_argument("--rows", type=_ints, default=None,
                       help="scale: row counts of the synthetic files, e.g. 1000000,3000000")
    bench.add_argument("--epochs", type=int, default=None, help="epochs of the deep methods")
    bench.add_argument("--methods", type=_names, default=None,
                       help=f"comma-separated; default {','.join(DEFAULT_METHODS)}, plus "
                            "pyod_knn for quick and digits and "
                            f"{','.join(PYOD_PEERS)} for mnist, images and adbench")
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
    fit.add_argument("--score-rule", default=None,
                     help="auto (default), global_fused, fused, latent_fused, latent_lof, "
                          "latent_knn, latent_mahalanobis, joint, reconstruction, energy, elbo")
    fit.add_argument("--epochs", type=int, default=None,
                     help="passes over the rows (default 100); with --missing mask, passes "
                          "of observed entries: a share s observed gets ceil(EPOCHS / s) passes")
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
    fit.add_argument("--bank-size", type=int, default=None,
                     help="most training codes kept for the neighbour rules (default 50000)")
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
    fit.add_argument("--stream", action="store_true",
                     help="read DATA in batches and train from a float32 copy on disk, so "
                          "that memory does not grow with the rows (no --missing mask, no "
                          "--calibration)")
    fit.add_argument("--spill-dir", type=Path, default=None,
                     help="with --stream: directory for the float32 copy (default: a "
                          "temporary directory)")

    export = commands.add_parser("export", help="export a saved detector to ONNX")
    export.add_argument("model", type=Path, help="directory written by detector.save()")
    export.add_argument("out", type=Path, help="output .onnx file")
    export.add_argument("--graph", choices=("scorer", "encoder", "energy"), default="scorer")

    score = commands.add_parser("score", help="score a data file, write a CSV")
    score.add_argument("model", type=Path, help=".onnx file or saved detector directory")
    score.add_argument("data", type=Path, help=".npy (memory-mapped), .npz, .csv, .parquet or "
                                               "a directory of .parquet files")
    score.add_argument("--out", type=Path, default=Path("scores.csv"),
                       help="a .csv or .parquet file; rows are read, scored and written in "
                            "batches, so memory stays flat however large DATA is")
    score.add_argument("--alpha", type=float, default=None,
                       help="flag rows whose conformal p-value is at most ALPHA (a calibrated "
                            "model) instead of using the saved threshold")
    return parser


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
               "missing": args.missing, "bank_size": args.bank_size}
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
                               mlflow_experiment=args.mlflow_experiment, register=args.register,
                               stream=args.stream, spill_dir=args.spill_dir)
        members = detector.n_members_
        epochs = sum(record.get("member", 0) == 0 for record in detector.training_history_)
        print(f"fitted on {detector.n_features_in_} features, {epochs} epochs"
              + (f" x {members} members" if members > 1 else "") + f" -> {args.out}")
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
