"""scripts/gpu_check.sh's dry run (GPU_CHECK_DRY=1: the CPU, digits, 1 epoch, bench --tiny): every
step runs, exits 0 and leaves its log and results, so that on a GPU the only unknown is speed."""

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["data", "tests", "bench", "teacher", "scifar_s4d", "lra_s4d", "sequencer"]


@pytest.mark.slow
def test_the_dry_run_of_the_gpu_check_runs_every_step(tmp_path):
    """About 1.5 min on 2 CPU cores."""
    env = {
        **os.environ,
        "GPU_CHECK_DRY": "1",
        "OUT": str(tmp_path),
        "GPU_CHECK_PYTHON": sys.executable,
    }
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    header, *rows = [line.split() for line in (tmp_path / "summary.txt").read_text().splitlines()]
    assert header == ["step", "exit", "seconds", "limit_s", "status"]
    assert [r[0] for r in rows] == STEPS
    assert all(r[1] == "0" and r[4] == "ok" and 0 < float(r[2]) < float(r[3]) for r in rows), rows
    assert all((tmp_path / f"{step}.log").stat().st_size > 0 for step in STEPS)
    results = (tmp_path / "results.txt").read_text()
    # the teacher step's student and undistilled twin, S4D twice, the Sequencer
    assert len(re.findall(r"^ok +test_acc", results, re.MULTILINE)) == 5
    assert re.search(r"^teacher fast_cnn on digits: test_acc [01]\.\d{4}", results, re.MULTILINE)
    suite = ET.parse(tmp_path / "tests.xml").getroot().find("testsuite")
    counts = {k: int(suite.get(k)) for k in ("tests", "skipped", "failures", "errors")}
    assert counts["tests"] > 0 and counts["skipped"] == counts["tests"]  # no CUDA here
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["tiny"] and bench["device"] == "cpu"
