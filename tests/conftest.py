"""Test isolation: set before seqlstm is imported (it reads $SEQLSTM_OUTPUTS at import time)."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

_OUTPUTS = tempfile.mkdtemp(prefix="seqlstm-test-outputs-")
atexit.register(shutil.rmtree, _OUTPUTS, ignore_errors=True)
os.environ["SEQLSTM_OUTPUTS"] = _OUTPUTS  # runs, checkpoints and summary.csv never touch outputs/
os.environ.pop(
    "MLFLOW_TRACKING_URI", None
)  # tracking goes to the SQLite store under the tmp outputs
os.environ.setdefault("SEQLSTM_DATA", str(Path(__file__).resolve().parents[1] / "data"))

torch.set_num_threads(
    min(2, torch.get_num_threads())
)  # small tensors: more threads only add contention


@pytest.fixture
def data_dir(request):
    """The data folder ($SEQLSTM_DATA). A test marked `needs_data("A", "B")` is skipped unless
    A or B exists under it."""
    root = Path(os.environ["SEQLSTM_DATA"])
    marker = request.node.get_closest_marker("needs_data")
    wanted = marker.args if marker else ()
    if not root.is_dir() or (wanted and not any((root / w).is_dir() for w in wanted)):
        pytest.skip(
            f"no {' or '.join(wanted) or 'data folder'} under {root}: unpack "
            "../shared/data/*.tar.gz "
            f"there (or set $SEQLSTM_DATA to the folder that holds them)"
        )
    return root


@pytest.fixture
def outputs(tmp_path, monkeypatch):
    """A fresh outputs/ (runs, MLflow store, summary.csv) and teacher cache for this test; a
    report's kernel started from here sees the same (the environment)."""
    out = tmp_path / "outputs"
    monkeypatch.setenv("SEQLSTM_OUTPUTS", str(out))
    monkeypatch.setenv("SEQLSTM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return out


QUICK = {
    "dataset": "digits",
    "seq_len": 4,
    "epochs": 1,
    "batch_size": 64,
    "lr": 0.01,
    "threads": 1,
    "overview_per_class": 0,
    "experiment": "runs",
}


@pytest.fixture
def quick_report():
    """plan(**overrides) -> (runs, loaded data): a one-epoch report on digits, every input
    checked and its data loaded, as the notebook's setup cell does."""
    from seqlab import report, schema

    def plan(**overrides):
        return report.prepare_report({**schema.defaults(), **QUICK, **overrides})

    plan.params = QUICK
    return plan
