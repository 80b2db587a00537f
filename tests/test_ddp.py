"""Scale-out: a 2-process DDP run on CPU (gloo) shards every epoch by rank, tests once and is
tracked once, by rank 0."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import seqlstm

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, os, sys
sys.path.insert(0, {root!r})
import seqlstm
from seqlab import cli
seen, iterate = {seen!r}, seqlstm.Batches.__iter__

def recording(self):  # every rank writes the training images of each epoch it reads
    if self.shuffle:
        rank = os.environ.get("LOCAL_RANK", "0")
        with open(f"{{seen}}/rank{{rank}}-epoch{{self.epoch}}.json", "w") as f:
            json.dump(self.indices().tolist(), f)
    return iterate(self)

seqlstm.Batches.__iter__ = recording
cli.main(sys.argv[1:])
"""


def test_shards_are_disjoint_equal_and_cover_the_epoch():
    y = torch.arange(10)
    shards = [seqlstm.Batches(y, y, 3, shuffle=True, seed=1, rank=r, world=2) for r in (0, 1)]
    for epoch in (0, 1):
        for b in shards:
            b.set_epoch(epoch)
        a, b = (s.indices() for s in shards)
        assert len(a) == len(b) == 5 and not set(a.tolist()) & set(b.tolist())
        assert torch.equal(
            torch.cat([a, b]), shards[0].order(epoch)
        )  # the epoch's permutation, split
    assert len(shards[0]) == 2  # batches of this rank's 5 images
    odd = [
        seqlstm.Batches(torch.arange(7), torch.arange(7), 2, rank=r, world=2).indices()
        for r in (0, 1)
    ]
    assert sorted(torch.cat(odd).tolist()) == list(range(7))  # evaluation: every image once


@pytest.mark.slow
def test_two_process_ddp_sees_every_training_image_once_per_epoch(tmp_path):
    seen = tmp_path / "seen"
    seen.mkdir()
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT.format(root=str(ROOT), seen=str(seen)))
    out = tmp_path / "outputs"
    env = {**os.environ, "SEQLSTM_OUTPUTS": str(out), "PL_DISABLE_FORK": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    args = {
        "dataset": "digits",
        "seq_len": 4,
        "epochs": 2,
        "batch_size": 64,
        "limit_train": 1000,
        "threads": 1,
        "overview_per_class": 0,
        "strategy": "ddp",
        "devices": 2,
    }
    cmd = [sys.executable, str(script), "train", "--name", "ddp"] + [
        a for k, v in args.items() for a in ("-p", k, json.dumps(v))
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n_train = seqlstm.load_dataset("digits", limit_train=1000).counts()["train"]
    for epoch in (0, 1):
        a, b = (json.loads((seen / f"rank{r}-epoch{epoch}.json").read_text()) for r in (0, 1))
        assert len(a) == len(b) == n_train // 2 and not set(a) & set(b)
        assert sorted(a + b) == list(range(n_train))  # every training image exactly once
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert [(r["status"], r["epochs"]) for r in rows] == [("ok", "2")]  # rank 0 alone writes
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert (runs[0].data.params["devices"], runs[0].data.params["strategy"]) == ("2", "ddp")
    assert 0 < runs[0].data.metrics["test_acc"] <= 1
    assert len(client.get_metric_history(runs[0].info.run_id, "val_acc")) == 2
