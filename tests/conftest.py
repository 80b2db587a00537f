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
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tracking goes to the SQLite store under the tmp outputs
os.environ.setdefault("SEQLSTM_DATA", str(Path(__file__).resolve().parents[1] / "data"))

torch.set_num_threads(min(2, torch.get_num_threads()))  # small tensors: more threads only add contention


@pytest.fixture
def data_dir(request):
    """The data folder ($SEQLSTM_DATA). A test marked `needs_data("A", "B")` is skipped unless
    A or B exists under it."""
    root = Path(os.environ["SEQLSTM_DATA"])
    marker = request.node.get_closest_marker("needs_data")
    wanted = marker.args if marker else ()
    if not root.is_dir() or (wanted and not any((root / w).is_dir() for w in wanted)):
        pytest.skip(f"no {' or '.join(wanted) or 'data folder'} under {root}: unpack ../shared/data/*.tar.gz "
                    f"there (or set $SEQLSTM_DATA to the folder that holds them)")
    return root
