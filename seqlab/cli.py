"""The command line: `python seqlstm.py CMD` (or `python -m seqlab CMD`) with CMD one of report,
train, tune, bench, datasets, transforms, models. A bad input is one line on stderr and exit
status 2 before anything runs; failed runs exit 1 once everything else is done."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from functools import partial
from pathlib import Path

from seqlstm import (
    ARG_CHOICES,
    DATASETS,
    MODEL_INFO,
    SEQUENCES,
    count_params,
    create_model,
    dataset_options,
    list_datasets,
    list_models,
    list_sequences,
    model_input,
    sequence_shape,
)
from seqlab import files, render, report, runner, schema

BAD_INPUT = (ValueError, files.SetupError, FileNotFoundError)


def _fail(error, code=2):
    print(f"error: {error}", file=sys.stderr)
    sys.exit(code)


def _interrupt_kernel_on_signals():
    """Ctrl-C or SIGTERM to `report` becomes a KeyboardInterrupt in the kernel's running cell, so
    the run is marked KILLED and the notebook kept as NAME.failed; otherwise the kernel dies with
    its parent and the run stays RUNNING until the next start."""
    import psutil  # ipykernel's own dependency

    def interrupt(signum, frame):
        for child in psutil.Process().children(recursive=True):
            child.send_signal(signal.SIGINT)

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


# ---- what the registries hold: datasets, transforms, models


def describe_datasets():
    """One line per registered dataset: its name, what it is and its dataset_args."""
    lines = []
    for name in list_datasets():
        loader = DATASETS[name]
        if isinstance(loader, partial):
            base = next(k for k, v in DATASETS.items() if v is loader.func)
            text = f"{base} with dataset_args {loader.keywords}"
        else:
            # its docstring's first paragraph, on one line
            text = " ".join((loader.__doc__ or "").strip().split("\n\n")[0].split())
            options = ", ".join(f"{k}={v!r}" for k, v in dataset_options(name).items())
            text += f"  [dataset_args: {options}]" if options else ""
        lines.append(f"{name:<16} {text}")
    return lines


def describe_sequences(shape, seq_len):
    """Per transform: (T, F) for one image of `shape`, then each argument with its default (and
    valid values where they are a fixed set)."""
    import inspect

    lines = []
    for name in list_sequences():
        try:
            T, n = sequence_shape(name, shape, seq_len=seq_len)
            lines.append(f"{name:<12} {'x'.join(map(str, shape))} -> T={T}, F={n}")
        except ValueError as e:  # e.g. a default patch or crop that does not fit this size
            lines.append(f"{name:<12} {'x'.join(map(str, shape))} -> needs other arguments: {e}")
        for arg in list(inspect.signature(SEQUENCES[name]).parameters.values())[1:]:
            valid = f"  one of {list(ARG_CHOICES[arg.name])}" if arg.name in ARG_CHOICES else ""
            default = "report parameter seq_len" if arg.name == "seq_len" else repr(arg.default)
            lines.append(f"{'':<14}{arg.name} = {default}{valid}")
    return lines


def describe_models():
    """One line per model: its parameters at its default input, that input, its input form and
    paper."""
    lines = []
    for name in list_models():
        x, n_feat, args = model_input(name)
        n = count_params(create_model(name, in_features=n_feat, num_classes=10, **args))
        spec = MODEL_INFO[name]["input"]
        shown = (
            f"{spec['transform']} of {'x'.join(map(str, spec['image']))} -> (T, F) = "
            f"{tuple(x.shape[1:])}"
        )
        lines.append(
            f"{name:<18} {n:>10,} params  {MODEL_INFO[name]['input_form']:<8} {shown:<38} "
            f"{MODEL_INFO[name]['paper']}"
        )
    return lines


def report_command(args):
    """`report`: executes report.ipynb into outputs/NAME.ipynb and NAME.html."""
    import papermill as pm

    _interrupt_kernel_on_signals()
    try:
        executed, page = render.render_report(args.params, args.param, name=args.name)
    except BAD_INPUT as e:
        _fail(e)
    except pm.PapermillExecutionError as e:
        where = files.outputs() / f"{render.report_name(args.params, args.name)}.failed.html"
        if e.ename in ("KeyboardInterrupt", "SystemExit"):  # Lightning exits after an interrupt
            print(
                f"\ninterrupted: the run in progress is marked KILLED; the same command continues "
                f"it from its last checkpoint\nsee {where}",
                file=sys.stderr,
            )
            sys.exit(130)
        print(f"\nthe report failed: {e.ename}: {e.evalue}\nsee {where}", file=sys.stderr)
        sys.exit(1)
    print(f"executed notebook: {executed}\nHTML report:       {page}")


def train_command(args):
    """`train`: a report's runs without the notebook, one line per epoch and a summary, for DDP:
    Lightning's launcher starts this same command once per further device. The report of the same
    parameters then reuses the finished runs."""
    try:
        params = schema.read_report_params(args.params, args.param)
        schema.check_params(params, schema.SCHEMA)
        params.setdefault("experiment", render.report_name(args.params, args.name))
        runs, loaded = report.prepare_report({**schema.defaults(), **params})
    except BAD_INPUT as e:
        _fail(e)
    results = [runner.run_experiment(r, loaded[r.data.key]) for r in runs]
    if runner.process_rank(runs[0].compute) == 0:
        for run, r in zip(runs, results):
            print(
                f"{r.status:<7} test_acc {r.row.get('test_acc', '-'):<7} "
                f"MLflow run {r.row['mlflow_run_id']}  {run.title()}"
            )
        try:
            report.end_report(results)
        except report.RunsFailed as e:
            print(e, file=sys.stderr)
            sys.exit(1)


def tune_command(args):
    """`tune`: a bad input or an unusable storage fails before any trial."""
    from seqlab import tune

    try:
        code = tune.tune(
            args.params, args.trials, args.workers, args.storage, args.study, args.best
        )
    except BAD_INPUT as e:
        _fail(e)
    sys.exit(code)


def bench_command(args):
    from seqlab import bench

    bench.bench(quick=args.quick, json_path=args.json, threads=args.threads, tiny=args.tiny)


def transforms_command(args):
    parts = args.size.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        _fail(f"--size must be CxHxW, e.g. 1x28x28, got {args.size!r}")
    print("\n".join(describe_sequences(tuple(int(p) for p in parts), args.seq_len)))


def datasets_command(args):
    folder = f"{'<folder>':<16} train/ and test/ (or val/) in ImageFolder layout"
    print("\n".join(describe_datasets() + [folder]))


def _runs_arguments(p, what):
    p.add_argument("params", nargs="?", help="params/NAME.yaml (overrides of the defaults)")
    p.add_argument(
        "-p",
        "--param",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="override one parameter (VALUE is YAML: 20, [5, 10], cifar10)",
    )
    p.add_argument("--name", help=f"{what} (default: the params file's name)")


def _tune_arguments(p):
    p.add_argument("params", help="a params file with a `search` space (and optionally `pruner`)")
    p.add_argument(
        "--trials", type=int, default=20, help="trials the study should hold, all workers together"
    )
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    p.add_argument(
        "--storage",
        default="",
        help="an SQLAlchemy URL (postgresql://...) or a "
        "journal file (default: outputs/optuna.db; with --workers, outputs/optuna.journal)",
    )
    p.add_argument("--study", help="study name (default: the file's name); the same name continues")
    p.add_argument(
        "--best", help="where to write the best parameters (default: params/best_<study>.yaml)"
    )


def parser():
    ap = argparse.ArgumentParser(
        prog="seqlstm.py",
        description="seqlstm: classify images as "
        "sequences (report, train, tune, bench, and what is registered)",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    _runs_arguments(
        sub.add_parser(
            "report", help="execute report.ipynb with a params file into outputs/NAME.{ipynb,html}"
        ),
        "output name and MLflow experiment",
    )
    _runs_arguments(
        sub.add_parser(
            "train", help="a report's runs without the notebook (DDP: devices, num_nodes, strategy)"
        ),
        "MLflow experiment",
    )
    _tune_arguments(sub.add_parser("tune", help="Optuna search over a tune file's space"))
    b = sub.add_parser("bench", help="training and data throughput, fast path against naive")
    b.add_argument("--quick", action="store_true", help="shorter timings (each still a median)")
    b.add_argument(
        "--tiny",
        action="store_true",
        help="toy sizes, 0.01 s per figure: a dry run of every figure (the numbers mean nothing)",
    )
    b.add_argument("--json", help="also write the results as JSON to this path")
    b.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: all cores)")
    sub.add_parser("datasets", help="list datasets")
    tr = sub.add_parser(
        "transforms", help="list sequence transforms with T and F for an image size"
    )
    tr.add_argument("--size", default="3x32x32", help="image size CxHxW (default 3x32x32)")
    tr.add_argument("--seq-len", type=int, default=10, help="L of identity and the series")
    sub.add_parser("models", help="list models")
    return ap


COMMANDS = {
    "report": report_command,
    "train": train_command,
    "tune": tune_command,
    "bench": bench_command,
    "datasets": datasets_command,
    "transforms": transforms_command,
    "models": lambda args: print("\n".join(describe_models())),
}


def _crash(command: str, error: Exception):
    """An error nobody foresaw: one line naming it and where it was raised, the traceback in a
    file under outputs/errors/ (or the temporary folder when outputs/ cannot be written)."""
    import tempfile
    import time
    import traceback

    text = files.masked("".join(traceback.format_exception(error)))
    name = f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    try:
        where = files.write_text(files.outputs() / "errors" / name, text)
    except OSError:
        where = files.write_text(Path(tempfile.gettempdir()) / f"seqlstm-{name}", text)
    frame = traceback.extract_tb(error.__traceback__)[-1]
    said = files.masked(" ".join(str(error).split()))[:300]  # on one line
    print(
        f"error: {command} failed: {type(error).__name__}: {said} "
        f"(in {Path(frame.filename).name}:{frame.lineno}, {frame.name}); the full traceback is "
        f"in {where}",
        file=sys.stderr,
    )
    sys.exit(1)


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        COMMANDS[args.cmd](args)
    except Exception as e:  # noqa: BLE001 (anything unforeseen: one line, the trace in a file)
        _crash(args.cmd, e)
