"""The ``divtri`` command line.

``divtri bench``   run a benchmark suite and write tables;
``divtri export``  saved detector -> .onnx;
``divtri score``   .onnx or saved detector + data file -> CSV of scores and labels.

Commands import what they need when they run, so ``divtri score model.onnx`` never loads torch.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

SUITES = ("quick", "digits", "speed", "serving", "rest", "spark")
DEFAULT_METHODS = ("triangle", "vae_ablation", "isolation_forest", "lof", "ocsvm")


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}"
                                         ) from None


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
                            "speed: training throughput, triangle vs VAE, MNIST-sized images; "
                            "serving: CPU scoring, torch vs ONNX Runtime; "
                            "rest: load test of the MLflow REST server on 127.0.0.1; "
                            "spark: score 500k rows through spark_udf in local mode")
    bench.add_argument("--data", type=Path, default=None,
                       help="data directory: speed takes the MNIST npz directory, serving "
                            "the shared data root (with mnist/ and adbench/); random data if "
                            "omitted")
    bench.add_argument("--classes", "--digits", dest="classes", type=_ints, default=None,
                       help="held-out classes, e.g. 1,4,7 (default: all)")
    bench.add_argument("--seeds", type=_ints, default=None, help="e.g. 0,1,2")
    bench.add_argument("--epochs", type=int, default=None, help="epochs of the deep methods")
    bench.add_argument("--methods", type=_names, default=None,
                       help=f"comma-separated; default {','.join(DEFAULT_METHODS)}")
    bench.add_argument("--out", type=Path, default=Path("results"),
                       help="output directory (CSV and Markdown); reruns resume from it")

    export = commands.add_parser("export", help="export a saved detector to ONNX")
    export.add_argument("model", type=Path, help="directory written by detector.save()")
    export.add_argument("out", type=Path, help="output .onnx file")
    export.add_argument("--graph", choices=("scorer", "encoder", "energy"), default="scorer")

    score = commands.add_parser("score", help="score a data file, write a CSV")
    score.add_argument("model", type=Path, help=".onnx file or saved detector directory")
    score.add_argument("data", type=Path, help=".npy, .npz, .csv or .parquet")
    score.add_argument("--out", type=Path, default=Path("scores.csv"))
    return parser


def _held_out_report(log, out: Path) -> None:
    from evaluation.results import markdown, per_target, summary, write_tables

    frame = log.frame()
    tables = {"summary": summary(frame), "auroc_per_class": per_target(frame, "auroc"),
              "auprc_per_class": per_target(frame, "auprc")}
    write_tables(tables, out)
    print(f"results: {log.path}\n")
    print(markdown(tables["summary"]))


def run_bench(args: argparse.Namespace) -> int:
    import numpy as np

    from evaluation import datasets, speed
    from evaluation.methods import MethodOptions
    from evaluation.results import markdown, write_tables
    from evaluation.suites import digits_suite

    out = Path(args.out) / args.suite
    out.mkdir(parents=True, exist_ok=True)
    if args.suite == "speed":
        if args.data is not None:
            images = datasets.mnist(args.data)[0][:10000]
        else:
            images = np.random.RandomState(0).randint(0, 256, (10000, 28, 28)).astype(np.uint8)
        table = speed.training_throughput(images)
        write_tables({"throughput": table.set_index("objective")}, out)
        print(markdown(table.set_index("objective")))
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
    if args.suite == "spark":
        from evaluation.spark_run import spark_run

        table = spark_run()
        write_tables({"spark": table.set_index("rows")}, out)
        print(markdown(table.set_index("rows"), digits=6))
        return 0
    quick = args.suite == "quick"
    epochs = args.epochs if args.epochs is not None else (30 if quick else None)
    log = digits_suite(
        out,
        classes=args.classes if args.classes is not None else list(range(10)),
        seeds=args.seeds if args.seeds is not None else ([0] if quick else [0, 1, 2]),
        methods=args.methods or list(DEFAULT_METHODS),
        options=MethodOptions(epochs=epochs),
        verbose=True,
    )
    _held_out_report(log, out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "bench":
        return run_bench(args)
    if args.command == "export":
        from serving.commands import export_command

        print(export_command(args.model, args.out, args.graph))
        return 0
    from serving.commands import score_command

    n_rows = score_command(args.model, args.data, args.out)
    print(f"scored {n_rows} rows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
