"""summary.csv: one row per run (status ok, failed or reused) under outputs/, only ever appended
to, a whole row per write under an inter-process lock."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from seqlab import files

SUMMARY_FIELDS = [
    "report",
    "status",
    "dataset",
    "model",
    "variant",
    "transform",
    "seq_len",
    "seed",
    "epochs",
    "teacher",
    "test_acc",
    "macro_f1",
    "n_params",
    "train_seconds",
    "train_images_per_s",
    "mlflow_run_id",
    "error",
]


def _header(path: Path):
    """The column names of a CSV file (a BOM is no part of them), or None if it is empty."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        return next(csv.reader(f), None)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _summary_file(path: Path) -> Path:
    """`path`, or if it holds other columns (an older version's), the first of NAME-2.csv,
    NAME-3.csv, ... that holds today's or is new: a file is never rewritten."""
    for n in range(1, 1000):
        found = path if n == 1 else path.with_name(f"{path.stem}-{n}{path.suffix}")
        if not found.exists() or found.stat().st_size == 0 or _header(found) == SUMMARY_FIELDS:
            break
    if found != path:
        print(
            f"note: {path} has other columns than today's: left as it is; this row goes to "
            f"{found.name}",
            flush=True,
        )
    return found


def append_summary(row, path=None):
    """One row per run (status ok, failed or reused), appended whole (one write, under an
    inter-process lock) to summary.csv: the file is only ever appended to."""
    path = Path(path or files.outputs() / "summary.csv")
    path.parent.mkdir(parents=True, exist_ok=True)
    with files.lock("summary"):
        path = _summary_file(path)
        fresh = not path.exists() or path.stat().st_size == 0
        text = io.StringIO()
        w = csv.DictWriter(text, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
        if fresh:
            w.writeheader()
        w.writerow(row)
        cut = "" if fresh or _ends_with_newline(path) else "\n"  # a line cut short stays apart
        with open(path, "ab") as f:
            f.write((cut + text.getvalue()).encode("utf-8"))
