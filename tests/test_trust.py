"""Trust: nothing from data or parameters executes, a password is never written down, a broken
cache file is set aside and rebuilt, a switch is a boolean."""

import io
import os
import re

import pytest
import torch

from seqlab import files, plan, render, runner, schema, summary, teacher, tracking, tune


class Payload:
    """A pickle that, when loaded as one, writes a file: what a crafted teacher.pt could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_bytes_at_any_depth_are_refused_before_anything_runs(tmp_path, outputs):
    injected = "{gru: {epochs: !!binary aW1wb3J0IG9zOyBvcy5zeXN0ZW0oJ3RvdWNoIC90bXAvcHduZWQnKQ==}}"
    with pytest.raises(schema.ParamError, match=r"per_model\['gru'\]\['epochs'\] = b.import os"):
        render.render_report("params/smoke.yaml", [("per_model", injected)], out_dir=tmp_path)
    assert not list(tmp_path.glob("*.ipynb"))  # no notebook was executed
    with pytest.raises(schema.ParamError, match=r"model_args\['hidden'\] = b"):
        plan.plan_report({**schema.defaults(), "model_args": {"hidden": b"32"}})
    with pytest.raises(schema.ParamError, match=r"per_model\['gru'\]: parameter epochs = 'x'"):
        plan.plan_report({**schema.defaults(), "per_model": {"gru": {"epochs": "x"}}})  # not run


def test_a_crafted_teacher_file_does_not_run_and_is_set_aside(tmp_path, capsys):
    marker, path = tmp_path / "ran", tmp_path / "teacher.pt"
    torch.save({"state_dict": {}, "info": Payload(marker), "table": None}, path)
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)  # what the cache refuses ...
    torch.load(path, weights_only=False)
    assert marker.exists()  # ... is what would have run
    marker.unlink()
    assert teacher._read_teacher(path, data=None) is None
    assert not marker.exists() and not path.exists() and (tmp_path / "teacher.pt.broken").exists()
    assert "cannot be read" in capsys.readouterr().out


def test_a_truncated_teacher_file_is_named_and_set_aside(tmp_path, capsys):
    path = tmp_path / "teacher.pt"
    saved = {"state_dict": {"w": torch.ones(3)}, "table": torch.zeros(4, 2, 10), "info": {}}
    teacher._save_teacher(saved, path)
    path.write_bytes(path.read_bytes()[:100])
    assert teacher._read_teacher(path, data=None) is None
    assert f"the cached teacher {path} cannot be read" in capsys.readouterr().out


def test_a_switch_takes_true_or_false_only():
    import seqlstm

    with pytest.raises(ValueError, match=r"bidirectional must be True or False, got 'no' \(model"):
        seqlstm.create_model("bilstm_fc", in_features=12, num_classes=3, bidirectional="no")


def test_passwords_are_masked_in_what_is_shown_logged_and_written(outputs):
    url = "postgresql://bob:s3cret@db.example:5432/studies"
    assert files.masked(f"storage {url}") == "storage postgresql://bob:***@db.example:5432/studies"
    assert files.masked({"a": [url]}) == {"a": ["postgresql://bob:***@db.example:5432/studies"]}
    assert files.without_password(url) == "postgresql://bob@db.example:5432/studies"
    tracker = tracking.Tracker("secrets")
    run_id = tracker.create("r")
    tracker.log_params(run_id, {"tune_storage": url})
    tracker.tag(run_id, {"note": url})
    client, _ = tracker.mlflow()
    run = client.get_run(run_id)
    assert "s3cret" not in str(run.data.params) + str(run.data.tags)


def test_the_best_parameters_file_keeps_no_password(tmp_path):
    import optuna

    study = optuna.create_study(direction="maximize")
    study.add_trial(
        optuna.trial.create_trial(
            params={"lr": 0.01},
            value=0.5,
            distributions={"lr": optuna.distributions.FloatDistribution(1e-3, 1e-1)},
        )
    )
    spec = tune.TuneSpec(
        params={}, given={"dataset": "digits"}, space={}, model_keys=set(), pruner="median"
    )
    url = "postgresql://bob:s3cret@db.example/studies"
    best = tune.write_best(study, spec, tmp_path / "best.yaml", url)
    text = best.read_text()
    assert "s3cret" not in text and "postgresql://bob@db.example/studies" in text
    assert "PGPASSWORD" in text and not list(tmp_path.glob(".*.tmp"))


# ---- MLflow's database: made whole, or made again


def _make_store(out):
    """A child process's work: open (and so create) the tracking store, start and end a run."""
    os.environ["SEQLSTM_OUTPUTS"] = str(out)
    t = tracking.Tracker("kills")
    t.end(t.create("r"))


@pytest.mark.slow
def test_killing_the_first_mlflow_db_creation_leaves_a_store_that_works(tmp_path, monkeypatch):
    import multiprocessing
    import random
    import signal
    import time

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore  # noqa: F401
    from mlflow.tracking import MlflowClient  # noqa: F401

    tracking._quiet_mlflow()  # imported once here: each child is a fork that creates the db
    fork = multiprocessing.get_context("fork")
    out = tmp_path / "outputs"
    t = time.perf_counter()
    whole = fork.Process(target=_make_store, args=(tmp_path / "timed",))
    whole.start(), whole.join()
    took = time.perf_counter() - t  # how long one creation takes: the kills fall within it
    random.seed(0)
    for i in range(12):  # spread over the creation, migrations included
        child = fork.Process(target=_make_store, args=(out,))
        child.start()
        time.sleep((i + random.random()) / 12 * took)
        os.kill(child.pid, signal.SIGKILL)
        child.join()
    final = fork.Process(target=_make_store, args=(out,))
    final.start(), final.join()
    assert final.exitcode == 0  # the same command, not killed, succeeds
    monkeypatch.setenv("SEQLSTM_OUTPUTS", str(out))
    client, experiment_id = tracking.Tracker("kills").mlflow()
    assert "FINISHED" in {r.info.status for r in client.search_runs([experiment_id])}
    assert not list(out.glob("mlflow.db.tmp-*"))


def test_a_half_made_mlflow_db_is_set_aside_and_made_again(outputs, capsys):
    import sqlite3

    outputs.mkdir()
    with sqlite3.connect(outputs / "mlflow.db") as con:  # tables begun, no schema version yet
        con.execute("create table experiments (experiment_id integer primary key, name text)")
        con.execute("create table runs (run_uuid text primary key)")
    tracker = tracking.Tracker("again")
    client, experiment_id = tracker.mlflow()
    assert client.get_experiment(experiment_id).name == "again"
    assert "was half made" in capsys.readouterr().out
    assert len(list(outputs.glob("mlflow.db.broken-*"))) == 1


# ---- what cannot fit is refused; what nobody foresaw is one line


def _cli(out, *args, code=""):
    """`seqlstm.py ARGS` in a subprocess (after `code`, run first in it): (exit code, stderr)."""
    import subprocess
    import sys

    env = {**os.environ, "SEQLSTM_OUTPUTS": str(out), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    script = f"import sys; from seqlab import cli\n{code}\ncli.main(sys.argv[1:])"
    done = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=files.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return done.returncode, done.stderr


@pytest.mark.parametrize(
    "param, value",
    [("seq_len", "100000000"), ("image_size", "100000")],
)
def test_a_run_that_cannot_fit_is_refused_with_its_numbers(tmp_path, param, value):
    code, stderr = _cli(tmp_path / "out", "train", "params/smoke.yaml", "-p", param, value)
    assert code == 2, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: parameter {param} = {value}: ")
    assert re.search(r"needs at least [\d.,]+ [GTP]B, above the [\d.,]+ [KMGT]B of", last)
    assert "Traceback" not in stderr


def test_an_unforeseen_error_is_one_line_and_its_traceback_a_file(tmp_path):
    boom = (
        "from seqlab import report\n"
        "def boom(*a, **k): raise KeyError('no such thing')\n"
        "report.prepare_report = boom"
    )
    code, stderr = _cli(tmp_path / "out", "train", "params/smoke.yaml", code=boom)
    assert code == 1 and "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: train failed: KeyError: 'no such thing' (in <string>:3, boom)")
    trace = list((tmp_path / "out" / "errors").glob("train-*.txt"))
    assert len(trace) == 1 and str(trace[0]) in line and "Traceback" in trace[0].read_text()


# ---- no run stays RUNNING when nothing runs it


def test_a_run_that_fails_on_a_full_disk_is_still_marked_failed(outputs, quick_report, capsys):
    from seqlab import runner

    runs, _ = quick_report()
    tracker = tracking.Tracker("runs")
    run_id = tracker.create("full disk")

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    tracker.client.log_text = full
    tracker.client.set_tag = full
    real_summary, summary.append_summary = summary.append_summary, full
    try:
        result = runner.fail_run(tracker, run_id, runs[0], OSError(28, "No space left on device"))
    finally:
        summary.append_summary = real_summary
    assert result.status == "failed"
    client, _ = tracker.mlflow()
    assert client.get_run(run_id).info.status == "FAILED"
    out = capsys.readouterr().out
    assert "failure.txt could not be written (OSError" in out and "summary.csv's row" in out


def test_runs_left_running_by_a_dead_process_are_marked_killed_at_the_next_start(
    outputs, quick_report, capsys
):
    import subprocess
    import sys

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    tracker = tracking.Tracker("runs")
    dead, alive = tracker.create("dead"), tracker.create("alive")
    tracker.tag(dead, {tracking.PID: gone.pid})  # as a SIGKILLed report leaves its run
    quick_report()
    client, _ = tracker.mlflow()
    assert client.get_run(dead).info.status == "KILLED"
    assert client.get_run(alive).info.status == "RUNNING"  # this process runs it
    assert f"left RUNNING by process {gone.pid}, which no longer exists" in capsys.readouterr().out


# ---- summary.csv: only ever appended to


def _row(**values):
    return {**dict.fromkeys(summary.SUMMARY_FIELDS, ""), "report": "r", "status": "ok", **values}


def test_summary_csv_is_appended_to_never_rewritten(tmp_path):
    import csv

    path = tmp_path / "summary.csv"
    summary.append_summary(_row(model="a"), path)
    before = path.read_bytes()
    path.write_bytes(before + b"r,ok,digits")  # a row cut short by a kill
    summary.append_summary(_row(model="b"), path)
    after = path.read_bytes()
    assert after.startswith(before + b"r,ok,digits")  # what was there is left byte for byte
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert [r["model"] for r in rows if r["status"] == "ok" and r["model"]] == ["a", "b"]
    bom = tmp_path / "bom.csv"  # today's columns after a BOM (a spreadsheet saved it)
    bom.write_bytes(b"\xef\xbb\xbf" + before)
    summary.append_summary(_row(model="c"), bom)
    assert bom.read_bytes() == b"\xef\xbb\xbf" + before + before.split(b"\n", 1)[1].replace(
        b",a,", b",c,"
    )


def test_a_summary_csv_with_other_columns_is_left_alone(tmp_path, capsys):
    import csv

    path = tmp_path / "summary.csv"
    old = b"report,status,test_acc\r\nold,ok,0.5\r\n"  # an older version's columns
    path.write_bytes(old)
    summary.append_summary(_row(model="new"), path)
    assert path.read_bytes() == old
    moved = tmp_path / "summary-2.csv"
    assert [r["model"] for r in csv.DictReader(io.StringIO(moved.read_text()))] == ["new"]
    assert "has other columns than today's: left as it is; this row goes to summary-2.csv" in (
        capsys.readouterr().out
    )
    summary.append_summary(_row(model="next"), path)
    assert len(list(csv.DictReader(io.StringIO(moved.read_text())))) == 2
    assert path.read_bytes() == old


def test_a_truncated_last_checkpoint_starts_that_run_afresh(outputs, quick_report, capsys):
    from seqlab import runner

    runs, loaded = quick_report()
    data = loaded[runs[0].data.key]
    client, experiment_id = tracking.Tracker("runs").mlflow()
    key = tracking.run_key(runs[0].params, data)
    dead = client.create_run(experiment_id, tags={tracking.KEY: key}).info.run_id  # as killed
    last = files.checkpoint_dir(dead) / "last.ckpt"
    last.parent.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.ones(1000)}, "epoch": 1}, last)
    last.write_bytes(last.read_bytes()[:300])  # the kill came during its write
    result = runner.run_experiment(runs[0], data)
    assert result.status == "ok" and result.row["mlflow_run_id"] != dead
    assert f"note: the last checkpoint {last} of MLflow run {dead} cannot be read" in (
        capsys.readouterr().out
    )
    assert (last.parent / "last.ckpt.broken").exists()


# ---- a moved outputs folder, an unreadable finished run


def test_a_moved_outputs_folder_reuses_its_runs(tmp_path, monkeypatch, quick_report, capsys):
    from seqlab import runner

    monkeypatch.setenv("SEQLSTM_OUTPUTS", str(tmp_path / "before"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # an earlier test's logger set it
    runs, loaded = quick_report()
    first = runner.run_experiment(runs[0], loaded[runs[0].data.key])
    (tmp_path / "before").rename(tmp_path / "after")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # Lightning's logger set it
    monkeypatch.setenv("SEQLSTM_OUTPUTS", str(tmp_path / "after"))
    monkeypatch.setattr(runner, "train_run", lambda *a, **k: pytest.fail("retrained"))
    runs, loaded = quick_report()
    again = runner.run_experiment(runs[0], loaded[runs[0].data.key])
    assert (first.status, again.status) == ("ok", "reused")
    assert again.row["mlflow_run_id"] == first.row["mlflow_run_id"]
    assert "note: the outputs folder moved" in capsys.readouterr().out
    client, _ = tracking.Tracker("runs").mlflow()
    where = client.get_run(first.row["mlflow_run_id"]).info.artifact_uri
    assert where.startswith((tmp_path / "after").as_uri())


def test_a_finished_run_that_cannot_be_read_back_is_trained_again(outputs, quick_report, capsys):
    from seqlab import runner

    runs, loaded = quick_report()
    first = runner.run_experiment(runs[0], loaded[runs[0].data.key])
    client, _ = tracking.Tracker("runs").mlflow()
    artifacts = client.get_run(first.row["mlflow_run_id"]).info.artifact_uri
    (files.Path(artifacts.removeprefix("file://")) / "result.json").write_text("{cut")
    again = runner.run_experiment(runs[0], loaded[runs[0].data.key])
    assert again.status == "ok" and again.row["mlflow_run_id"] != first.row["mlflow_run_id"]
    assert f"the finished MLflow run {first.row['mlflow_run_id']} cannot be read back" in (
        capsys.readouterr().out
    )


# ---- names are text: in figures, Markdown and HTML; a figure that fails costs that figure


def test_a_class_name_with_mathtext_is_drawn_as_written(tmp_path):
    import numpy as np

    from seqlab import figures

    classes = ["$\\frac{$", "a_b", "$x$"]
    fig = figures.plot_confusion(np.eye(3, dtype=int), classes, "data $\\frac{$")
    fig.savefig(tmp_path / "cm.png")  # mathtext would fail here: "$\frac{$" does not parse
    shown = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert [t.replace("\\$", "$") for t in shown] == classes
    figures.close(fig)


def test_names_are_escaped_in_markdown_and_html():
    import pandas as pd

    from seqlab import report, sections

    line = report.md("<script>alert(1)</script> *x* $y$")
    assert "<script>" not in line and "\\*x\\*" in line and "\\$y\\$" in line
    page = sections.table_html(pd.DataFrame({"class": ["<b>bold</b>"]}))
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold" not in page


def test_a_figure_that_cannot_be_drawn_costs_no_training(
    outputs, quick_report, monkeypatch, capsys
):
    from seqlab import figures, runner, sections

    def broken(*args, **kwargs):
        raise ValueError("cannot draw this")

    monkeypatch.setattr(figures, "plot_confusion", broken)
    monkeypatch.setattr(figures, "plot_sequence", broken)
    runs, loaded = quick_report()
    result = runner.run_experiment(runs[0], loaded[runs[0].data.key])
    assert result.status == "ok" and result.sequence_fig is None
    client, _ = tracking.Tracker("runs").mlflow()
    run = client.get_run(result.row["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "test_acc" in run.data.metrics
    out = capsys.readouterr().out
    assert "warning: the confusion matrix could not be drawn (ValueError: cannot draw this)" in out
    assert "(not drawn: the sequence)" in sections.image(result.sequence_fig, "the sequence")


@pytest.mark.slow
def test_no_output_of_a_report_holds_a_storage_password(tmp_path, outputs, capfd):
    url = "postgresql://user:SECRET@127.0.0.1:1/db"  # never connected to: no tune_study
    try:
        executed, page = render.render_report(
            "params/smoke.yaml", [("seq_len", "2"), ("tune_storage", url)], out_dir=outputs
        )
    finally:
        os.environ.pop("SEQLSTM_SECRET_TUNE_STORAGE", None)
    assert "postgresql://user@127.0.0.1:1/db" in executed.read_text()  # the cell, without it
    written = [p for p in outputs.rglob("*") if p.is_file()]
    assert executed in written and page in written and (outputs / "summary.csv") in written
    assert any(p.name == "params.yaml" for p in written)  # MLflow's artifacts are in the search
    assert [str(p) for p in written if b"SECRET" in p.read_bytes()] == []  # mlflow.db included
    printed = capfd.readouterr()
    assert "SECRET" not in printed.out + printed.err


def test_a_broken_decoded_image_cache_is_named_set_aside_and_rebuilt(tmp_path, monkeypatch, capsys):
    import numpy as np
    from PIL import Image

    import seqlstm

    monkeypatch.setenv("SEQLSTM_CACHE", str(tmp_path / "cache"))
    for split in ("train", "test"):
        for name in ("ant", "bee"):
            (tmp_path / "tiny" / split / name).mkdir(parents=True)
            for i in range(3):
                pixels = np.full((4, 4, 3), 40 * i, dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / "tiny" / split / name / f"{i}.png")
    first = seqlstm.load_dataset(str(tmp_path / "tiny"), data_dir=tmp_path)
    (cache,) = (tmp_path / "cache").glob("*.pt")
    cache.write_bytes(cache.read_bytes()[:200])  # cut short (a kill, a full disk)
    again = seqlstm.load_dataset(str(tmp_path / "tiny"), data_dir=tmp_path)
    assert torch.equal(again.test_x, first.test_x) and again.classes == first.classes
    out = capsys.readouterr().out
    assert f"note: the decoded-image cache {cache} cannot be read" in out
    assert (cache.parent / (cache.name + ".broken")).exists() and cache.exists()  # rebuilt
    torch.save({"not": "splits"}, cache)  # readable, but not a decoded folder
    assert seqlstm.load_dataset(str(tmp_path / "tiny"), data_dir=tmp_path).classes == ["ant", "bee"]


def test_a_teacher_fetched_from_mlflow_is_moved_within_the_cache_filesystem(outputs, monkeypatch):
    import errno
    from pathlib import Path
    from types import SimpleNamespace

    tracker = tracking.Tracker(teacher.TEACHER_EXPERIMENT)
    run_id = tracker.create("teacher", {"seqlstm.teacher_key": "k"})
    info = {"classes": ["a", "b"], "image_shape": [1, 4, 4], "recipe": {}}
    made = outputs / "made" / "teacher.pt"
    teacher._save_teacher({"state_dict": {"w": torch.ones(2)}, "table": None, "info": info}, made)
    tracker.log_file(run_id, made)
    tracker.tag(run_id, {tracking.STATUS: "ok"})
    tracker.end(run_id)
    replace = os.replace

    def within_one_filesystem(src, dst):  # the cache on a filesystem of its own
        if not Path(src).resolve().is_relative_to(Path(dst).resolve().parent):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", within_one_filesystem)
    cached = outputs / "cache" / "teachers" / "t-k.pt"
    data = SimpleNamespace(classes=["a", "b"], image_shape=(1, 4, 4))
    saved = teacher._download_teacher("k", cached, data)
    assert saved["info"]["classes"] == ["a", "b"] and cached.exists()


# ---- a resumed run logs each epoch once

KILLED_AT = """
import json, os, signal, sys
import pytorch_lightning as pl
from seqlab import report, runner, schema

class Kill(pl.Callback):  # SIGKILL at a chosen point of epoch 2's end
    def __init__(self, where):
        self.where = where
    def on_train_epoch_end(self, trainer, module):  # after the epoch's logging, before its ckpt
        if self.where == "before its checkpoint" and trainer.current_epoch == 1:
            os.kill(os.getpid(), signal.SIGKILL)
    def on_train_epoch_start(self, trainer, module):  # after all of epoch 2
        if self.where == "after its checkpoint" and trainer.current_epoch == 2:
            os.kill(os.getpid(), signal.SIGKILL)

params = {**schema.defaults(), **json.loads(sys.argv[1])}
runs, loaded = report.prepare_report(params, schema.types())
kill = [Kill(sys.argv[2])] if len(sys.argv) > 2 else []
r = runner.run_experiment(runs[0], loaded[runs[0].data.key], callbacks=kill)
print("RESULT", json.dumps({"row": r.row}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("where", ["before its checkpoint", "after its checkpoint"])
def test_a_run_killed_after_an_epoch_that_did_not_improve_logs_each_epoch_once(tmp_path, where):
    import json
    import subprocess
    import sys
    from functools import partial

    from conftest import QUICK
    from mlflow.tracking import MlflowClient

    epochs, out = 4, tmp_path / "out"
    params = {**QUICK, "epochs": epochs, "lr": 1e-12, "experiment": "twice"}  # none improves
    env = {**os.environ, "SEQLSTM_OUTPUTS": str(out)}
    env.pop("MLFLOW_TRACKING_URI", None)
    run = partial(subprocess.run, cwd=files.ROOT, env=env, capture_output=True, text=True)
    killed = run([sys.executable, "-c", KILLED_AT, json.dumps(params), where], timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run([sys.executable, "-c", KILLED_AT, json.dumps(params)], timeout=300)
    assert resumed.returncode == 0 and "resuming MLflow run" in resumed.stdout, resumed.stderr
    run_id = json.loads(resumed.stdout.split("RESULT ", 1)[1])["row"]["mlflow_run_id"]
    history = partial(MlflowClient(f"sqlite:///{out / 'mlflow.db'}").get_metric_history, run_id)
    for name in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "grad_norm_mean"):
        steps = [m.step for m in history(name)]
        assert len(steps) == epochs and len(set(steps)) == epochs, (name, steps)


# ---- a tracking URI that cannot work is one line, before anything runs


@pytest.mark.parametrize(
    "uri, said",
    [
        ("ftp://host/mlflow", "scheme 'ftp' is not one MLflow tracks to"),
        ("postgresql://bob:s3cret@127.0.0.1:1/mlflow", "its database driver is not installed"),
    ],
)
def test_a_tracking_uri_mlflow_cannot_use_is_refused_up_front(tmp_path, uri, said):
    import subprocess
    import sys

    env = {**os.environ, "SEQLSTM_OUTPUTS": str(tmp_path / "out"), "MLFLOW_TRACKING_URI": uri}
    done = subprocess.run(
        [sys.executable, "seqlstm.py", "report", "params/smoke.yaml"],
        cwd=files.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: MLFLOW_TRACKING_URI ") and said in line
    assert "s3cret" not in done.stdout + done.stderr and "Traceback" not in done.stderr
    assert not list((tmp_path / "out").glob("*.ipynb"))  # no kernel started


def test_training_leaves_no_tracking_uri_in_the_environment(outputs, quick_report):
    """Lightning's MLflow logger calls mlflow.set_tracking_uri, which sets $MLFLOW_TRACKING_URI:
    a later report, test or child process of the same process would track to this one's store."""
    runs, loaded = quick_report()
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert runner.run_experiment(runs[0], loaded[runs[0].data.key]).status == "ok"
    assert "MLFLOW_TRACKING_URI" not in os.environ
