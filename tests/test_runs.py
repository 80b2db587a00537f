"""Dependable runs: every input checked before training, resume after a kill, reuse of finished
runs, contained failures, concurrent reports, and a failed report that keeps the last good one."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import seqlstm
from seqlab import cli, cores, files, lightning, plan, render, report, runner, schema, tracking

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def summary(out):
    return list(csv.DictReader(open(out / "summary.csv")))


# ---- every input checked before anything trains


def test_scientific_notation_is_a_number():
    assert schema.parse_yaml("1e-3") == 0.001 and schema.parse_yaml("lr: 1E6") == {"lr": 1e6}
    assert schema.parse_yaml("-2.5e+3") == -2500.0 and schema.parse_yaml("3") == 3
    assert schema.typed_param("lr", "1e-3", "float") == 0.001  # a string from papermill -y
    assert isinstance(
        schema.typed_param("lr", 1, "float"), float
    )  # an int where a float is declared
    assert schema.typed_param("seq_len", [5, 10], "Union[int, list]") == [5, 10]


BAD = [  # (overrides, what the message must say)
    ({"batch_size": 0}, r"parameter batch_size = 0: must be >= 1"),
    ({"batch_size": -1}, r"parameter batch_size = -1: must be >= 1"),
    ({"epochs": 0}, r"parameter epochs = 0: must be >= 1"),
    ({"epochs": "three"}, r"parameter epochs = 'three' \(str\): expected int"),
    ({"dataset": 3}, r"parameter dataset = 3 \(int\): expected Union\[str, list\]"),
    ({"lr": "fast"}, r"parameter lr = 'fast' \(str\): expected float"),
    ({"lr": 0}, r"parameter lr = 0.0: must be > 0"),
    ({"threads": -2}, r"parameter threads = -2: must be >= 0"),
    ({"val_fraction": 1.0}, r"parameter val_fraction = 1.0: must be between 0 and 1"),
    (
        {"model": "no_such_model"},
        r"parameter model = 'no_such_model': valid values are \[.*'bilstm_fc'",
    ),
    (
        {"optimizer": "adamx"},
        r"parameter optimizer = 'adamx': valid values are \['adam', 'adamw', 'rmsprop', 'sgd'\]",
    ),
    (
        {"schedule": "cyclic"},
        r"parameter schedule = 'cyclic': valid values are "
        r"\['onecycle', 'none', 'cosine', 'warmup_cosine'\]",
    ),
    ({"init": "he"}, r"parameter init = 'he': valid values are \['default', 'orthogonal'\]"),
    ({"precision": 16}, r"parameter precision = 16: valid values are \['32', 'bf16-mixed'\]"),
    ({"label_smoothing": 1.0}, r"parameter label_smoothing = 1.0: must be in \[0, 1\)"),
    (
        {"schedule": "warmup_cosine", "warmup_epochs": 1, "epochs": 1},
        r"parameter warmup_epochs = 1: must be below epochs \(1\) for schedule warmup_cosine",
    ),
    (
        {"model": "fnet", "transform": "pixels", "init": "orthogonal"},
        r"parameter init = 'orthogonal' for model 'fnet': "
        r"init 'orthogonal' is for recurrent models",
    ),
    ({"augment": "mixup"}, r"parameter augment = 'mixup': valid values are"),
    ({"transform": "spiral"}, r"parameter transform = 'spiral': valid values are"),
    (
        {"limit_train": 999999999},
        r"limit_train=999999999 is above the 1,\d{3} training images of 'digits'",
    ),
    ({"seq_len": [2, 0]}, r"parameter seq_len = 0: must be >= 1"),
    (
        {"model": ["lstm", "gru"], "per_model": {"gru": {"optimizer": "adamx"}}},
        r"per_model\['gru'\]: parameter optimizer = 'adamx'",
    ),
    (
        {"model_args": {"hiddn": 8}},
        r"model_args \{'hiddn': 8\} for model 'bilstm_fc'.*valid keys are",
    ),
    (
        {"transform": "patches", "transform_args": {"patch": 3}},
        r"transform_args \{'patch': 3\} for transform 'patches' on 1x8x8 images: "
        r"patch=3 does not divide",
    ),
    ({"resume": "yes"}, r"parameter resume = 'yes' \(str\): expected bool"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_input_fails_before_any_run(outputs, monkeypatch, quick_report, overrides, message):
    monkeypatch.setattr(runner, "run_experiment", lambda *a, **k: pytest.fail("a run started"))
    args = [(k, json.dumps(v)) for k, v in {**quick_report.params, **overrides}.items()]
    with pytest.raises(ValueError, match=message):
        render.render_report(None, args, out_dir=outputs)
    assert not (outputs / "mlflow.db").exists() and not (outputs / "summary.csv").exists()


def test_bad_value_in_the_last_run_of_a_grid_fails_before_the_first(tmp_path):
    env = {**os.environ, "SEQLSTM_OUTPUTS": str(tmp_path / "outputs")}
    proc = subprocess.run(
        [PYTHON, "seqlstm.py", "report", "params/smoke.yaml", "-p", "seq_len", "[2, 0]"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: parameter seq_len = 0: must be >= 1"]
    assert "epoch" not in proc.stdout and not (tmp_path / "outputs" / "summary.csv").exists()


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset: digits\nseq_len: [2, 4\nepochs: 3\n")
    with pytest.raises(ValueError, match=rf"{bad}, line \d, column \d+: malformed YAML"):
        render.render_report(bad, out_dir=tmp_path)
    with pytest.raises(ValueError, match="cannot read params file .*missing.yaml"):
        render.render_report(tmp_path / "missing.yaml", out_dir=tmp_path)


def test_unwritable_outputs_and_silent_tracking_server_fail_in_seconds(
    tmp_path, monkeypatch, quick_report
):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(
        "SEQLSTM_OUTPUTS", str(blocker / "outputs")
    )  # below a file: cannot be created
    with pytest.raises(files.SetupError, match="outputs folder .* is not writable"):
        quick_report()
    monkeypatch.setenv("SEQLSTM_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    t = time.perf_counter()
    with pytest.raises(
        files.SetupError, match=r"tracking server http://127.0.0.1:9 does not answer"
    ):
        quick_report()
    assert time.perf_counter() - t < 10


# ---- resume, reuse, contained failures

RUNNER = """
import json, sys
from seqlab import report, runner, schema
params = {**schema.defaults(), **json.loads(sys.argv[1])}
runs, loaded = report.prepare_report(params, schema.types())
r = runner.run_experiment(runs[0], loaded[runs[0].data.key])
print("RESULT", json.dumps({"status": r.status, "row": r.row, "history": r.history}))
"""


def run_script(out, params, **popen):
    env = {**os.environ, "SEQLSTM_OUTPUTS": str(out)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(
        [PYTHON, "-c", RUNNER, json.dumps(params)],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **popen,
    )


def result_of(proc):
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(stdout.split("RESULT ", 1)[1])


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(tmp_path, quick_report):
    from mlflow.tracking import MlflowClient

    params = {
        **quick_report.params,
        "seq_len": 16,
        "epochs": 5,
        "batch_size": 16,
        "experiment": "resume",
    }
    whole = result_of(run_script(tmp_path / "a", params))

    out = tmp_path / "b"
    proc = run_script(out, params)
    deadline = time.time() + 300
    while (
        not list(out.glob("checkpoints/*/last.ckpt"))
        and time.time() < deadline
        and proc.poll() is None
    ):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # after the first epoch's checkpoint, no chance to clean up
    proc.communicate()
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    killed = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert [r.info.status for r in killed] == ["RUNNING"]  # what SIGKILL leaves behind
    done_before = int(killed[0].data.tags["seqlstm.last_epoch"])
    assert 1 <= done_before < 5, "the run finished before it could be killed"

    resumed = result_of(run_script(out, params))
    assert resumed["status"] == "ok" and resumed["row"]["mlflow_run_id"] == killed[0].info.run_id
    assert resumed["history"] == whole["history"]  # every epoch's metrics, to the digit
    assert resumed["row"]["test_acc"] == whole["row"]["test_acc"]
    assert resumed["row"]["macro_f1"] == whole["row"]["macro_f1"]
    runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"] and runs[0].data.tags[
        "seqlstm.last_epoch"
    ] == "5"
    assert sorted(p.name for p in (out / "checkpoints" / runs[0].info.run_id).iterdir()) == [
        "best.ckpt",
        "last.ckpt",
    ]


def test_finished_run_is_reused_not_retrained(outputs, monkeypatch, quick_report):
    runs, loaded = quick_report()
    first = runner.run_experiment(runs[0], loaded[runs[0].data.key])
    monkeypatch.setattr(
        runner, "train_run", lambda *a, **k: pytest.fail("retrained a finished run")
    )
    again = runner.run_experiment(runs[0], loaded[runs[0].data.key])
    assert (first.status, again.status) == ("ok", "reused")
    assert again.row["test_acc"] == first.row["test_acc"] and again.history == first.history
    assert again.row["mlflow_run_id"] == first.row["mlflow_run_id"]
    assert [r["status"] for r in summary(outputs)] == ["ok", "reused"]


def test_resume_false_trains_afresh_and_marks_a_dead_run_killed(outputs, quick_report):
    from mlflow.tracking import MlflowClient

    runs, loaded = quick_report()
    data = loaded[runs[0].data.key]
    client, experiment_id = tracking.Tracker("runs").mlflow()
    key = tracking.run_key(runs[0].params, data)
    dead = client.create_run(
        experiment_id, tags={"seqlstm.key": key}
    )  # as a SIGKILLed process leaves it
    fresh = runner.run_experiment(plan.Run({**runs[0].params, "resume": False}), data)
    assert fresh.status == "ok" and fresh.row["mlflow_run_id"] != dead.info.run_id
    assert MlflowClient(tracking.tracking_uri()).get_run(dead.info.run_id).info.status == "KILLED"


def test_code_version_is_recorded_with_every_run(outputs, quick_report):
    runs, loaded = quick_report()
    r = runner.run_experiment(runs[0], loaded[runs[0].data.key])
    client, _ = tracking.Tracker("runs").mlflow()
    tags = client.get_run(r.row["mlflow_run_id"]).data.tags
    import hashlib

    assert (
        tags["seqlstm.code.sha256_seqlstm_py"]
        == hashlib.sha256((ROOT / "seqlstm.py").read_bytes()).hexdigest()
    )
    assert (
        tags["seqlstm.code.sha256_report_ipynb"]
        == hashlib.sha256((ROOT / "report.ipynb").read_bytes()).hexdigest()
    )
    if (ROOT / ".git").exists():
        assert len(tags["seqlstm.code.git_commit"]) == 40 and tags["seqlstm.code.git_dirty"] in (
            "True",
            "False",
        )
    assert r.params["code"]["sha256_seqlstm_py"] == tags["seqlstm.code.sha256_seqlstm_py"]


def test_non_finite_loss_fails_that_run_and_the_next_one_runs(outputs, quick_report):
    runs, loaded = quick_report(
        model=["bilstm_fc", "lstm"], transform="rows", per_model={"bilstm_fc": {"lr": 1e38}}
    )
    results = [runner.run_experiment(r, loaded[r.data.key]) for r in runs]
    assert [r.status for r in results] == ["failed", "ok"]
    assert "non-finite" in results[0].error and "epoch 1, step" in results[0].error
    assert "grad_clip" in results[0].error
    client, _ = tracking.Tracker("runs").mlflow()
    failed = client.get_run(results[0].row["mlflow_run_id"])
    assert failed.info.status == "FAILED" and "non-finite" in failed.data.tags["seqlstm.failure"]
    assert [(r["model"], r["status"], r["report"]) for r in summary(outputs)] == [
        ("bilstm_fc", "failed", "runs"),
        ("lstm", "ok", "runs"),
    ]
    with pytest.raises(report.RunsFailed, match="bilstm_fc.*non-finite"):
        report.end_report(results)


def test_batch_order_is_a_function_of_seed_and_epoch():
    import torch

    y = torch.arange(50)
    straight = seqlstm.Batches(y, y, 8, shuffle=True, seed=3)
    epochs = [torch.cat([b for _, b in straight]) for _ in range(3)]  # one pass per epoch
    jumped = seqlstm.Batches(y, y, 8, shuffle=True, seed=3)
    jumped.set_epoch(2)  # as a run resumed at epoch 2
    assert torch.equal(torch.cat([b for _, b in jumped]), epochs[2])
    assert not torch.equal(epochs[1], epochs[2])


# ---- reports as a whole: concurrency, a failed report, the terminal


def start_report(out, *args, name="smoke"):
    env = {**os.environ, "SEQLSTM_OUTPUTS": str(out)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(
        [
            PYTHON,
            "seqlstm.py",
            "report",
            "params/smoke.yaml",
            "--name",
            name,
            "-p",
            "epochs",
            "1",
            "-p",
            "overview_per_class",
            "0",
            *args,
        ],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
def test_three_reports_started_at_once_all_succeed(tmp_path):
    out = tmp_path / "outputs"
    procs = [
        start_report(out, "-p", "seed", str(i), "-p", "seq_len", "2", name=f"r{i}")
        for i in range(3)
    ]
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
        assert "epoch   1/1" in stdout  # the per-epoch line, streamed to the terminal
        assert "without encryption" not in stderr
    rows = summary(out)
    assert sorted((r["report"], r["status"]) for r in rows) == [
        ("r0", "ok"),
        ("r1", "ok"),
        ("r2", "ok"),
    ]


@pytest.mark.slow
def test_failed_report_keeps_the_last_good_one(tmp_path):
    out = tmp_path / "outputs"
    good = start_report(out, "-p", "seq_len", "2")
    assert good.wait(timeout=600) == 0, good.stderr.read()[-3000:]
    html, notebook = (out / "smoke.html").read_bytes(), (out / "smoke.ipynb").read_bytes()
    bad = start_report(
        out, "-p", "seq_len", "[2, 3]", "-p", "lr", "1.0e+38", "-p", "resume", "false"
    )
    stdout, stderr = bad.communicate(timeout=600)
    assert bad.returncode == 1
    assert "non-finite training loss" in stdout and "smoke.failed.html" in stderr
    assert (out / "smoke.html").read_bytes() == html and (
        out / "smoke.ipynb"
    ).read_bytes() == notebook
    assert "non-finite" in (out / "smoke.failed.html").read_text()
    assert not list(out.glob(".smoke.*"))  # no temporary notebook left behind
    assert [r["status"] for r in summary(out)] == ["ok", "failed", "failed"]


@pytest.mark.slow
def test_sigterm_marks_the_run_killed_and_keeps_the_notebook(tmp_path):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "outputs"
    proc = start_report(
        out, "-p", "seq_len", "16", "-p", "epochs", "40", "-p", "batch_size", "8", name="term"
    )
    for line in proc.stdout:  # streamed as the kernel prints it
        if line.startswith("epoch   1/40"):
            break
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "marked KILLED" in stderr
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("term").experiment_id])
    assert [r.info.status for r in runs] == ["KILLED"] and int(
        runs[0].data.tags["seqlstm.last_epoch"]
    ) >= 1
    assert (out / "term.failed.ipynb").exists() and not (out / "term.ipynb").exists()


def test_transforms_command_shows_arguments_and_valid_values():
    lines = cli.describe_sequences((3, 32, 32), 10)
    assert "              order = 'raster'  one of ['raster', 'snake', 'permuted']" in lines
    assert (
        "              patch = 4" in lines
        and "              seq_len = report parameter seq_len" in lines
    )


def test_time_left_follows_the_recent_pace(monkeypatch, capsys):
    from types import SimpleNamespace

    clock = iter(
        [0.0, 30.0, 60.0, 63.0, 66.0, 69.0]
    )  # two slow epochs (another job ran), three fast ones
    monkeypatch.setattr(lightning.time, "perf_counter", lambda: next(clock))
    trainer = SimpleNamespace(current_epoch=0, max_epochs=25, is_global_zero=True)
    module = SimpleNamespace(history=[{"epoch": 1, "train_loss": 1.0}])
    log = lightning.EpochLog(recent=3)
    log.on_train_start(trainer, module)
    for epoch in range(5):
        trainer.current_epoch = epoch
        log.on_train_epoch_end(trainer, module)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "3.0 s/epoch, 1.0 min left" in last  # the cumulative average would say 13.8 s/epoch


def test_long_epochs_report_progress_within_the_epoch(monkeypatch, capsys):
    from types import SimpleNamespace

    clock = iter([0.0, 50.0, 100.0, 110.0, 200.0, 330.0])  # epoch start, then one read per batch
    monkeypatch.setattr(lightning.time, "perf_counter", lambda: next(clock))
    trainer = SimpleNamespace(
        current_epoch=0, max_epochs=3, is_global_zero=True, num_training_batches=10
    )
    log = lightning.EpochLog(every=120.0)
    log.on_train_epoch_start(trainer, None)
    batch = (None, [0] * 6400)
    for i in range(5):
        log.on_train_batch_end(trainer, None, None, batch, i)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "  epoch 1/3: batch 4/10 (40%), 128 images/s, epoch's training ends in 5.0 min",
        "  epoch 1/3: batch 5/10 (50%), 97 images/s, epoch's training ends in 5.5 min",
    ]


def test_a_run_says_when_other_processes_hold_the_cores_its_threads_need(capsys):
    cores.note_shared_cores(2, cores=2, others=1.0)
    assert "keep 1.0 of this machine's 2 cores busy" in capsys.readouterr().out
    cores.note_shared_cores(2, cores=2, others=1.0)
    for threads, n_cores, others in [
        (1, 2, 1.0),
        (2, 2, 0.1),
        (2, 4, 1.0),
    ]:  # its share, quiet, room enough
        cores.note_shared_cores(threads, cores=n_cores, others=others)
    out = capsys.readouterr().out
    assert out.count("note:") == 1 and "(threads: 1)" in out


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="other_load reads Linux's /proc")
def test_other_load_counts_another_process_busy_on_a_core():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert cores.other_load(0.5) >= 0.6  # the spinning process holds about one core
    finally:
        busy.kill(), busy.wait()


def test_a_fresh_and_a_reused_run_leave_no_figure_open(outputs, quick_report):
    import matplotlib.pyplot as plt

    runs, loaded = quick_report()
    plt.close("all")
    first = runner.run_experiment(runs[0], loaded[runs[0].data.key])
    assert first.status == "ok" and plt.get_fignums() == []
    again = runner.run_experiment(runs[0], loaded[runs[0].data.key])
    assert again.status == "reused" and plt.get_fignums() == []  # shown once, where displayed
    assert again.sequence_fig is not None


def test_last_ckpt_follows_every_epoch_not_only_the_improving_ones(outputs, quick_report):
    import seqlstm

    runs, loaded = quick_report(epochs=3, lr=1e-12)  # weights all but frozen: no epoch improves
    run, data = runs[0], loaded[runs[0].data.key]
    _, module = runner.build_run(run, data)
    trainer, _ = lightning.make_trainer(
        run.train, run.compute, checkpoints=outputs / "ck", steps_per_epoch=1
    )
    train = seqlstm.Batches(data.train_x, data.train_y, 64, shuffle=True)
    trainer.fit(module, train, seqlstm.Batches(data.val_x, data.val_y, 256))
    assert len({h["val_acc"] for h in module.history}) == 1  # the best is still epoch 1's
    best = torch.load(outputs / "ck" / "best.ckpt", weights_only=True)
    last = torch.load(outputs / "ck" / "last.ckpt", weights_only=True)
    assert (best["epoch"], last["epoch"]) == (0, 2)  # last.ckpt: the third epoch's
