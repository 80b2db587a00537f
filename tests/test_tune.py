"""`tune`: an Optuna study over report parameters. A tiny study on digits, pruning, the best
parameters as a params file, resuming, bad inputs before any trial, and workers sharing one study:
two processes on a journal file, two on a PostgreSQL server started here."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from seqlab import files, plan, render, report, runner, schema, studies, tracking, tune

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "dataset": "digits",
    "seq_len": 4,
    "epochs": 2,
    "batch_size": 64,
    "threads": 1,
    "overview_per_class": 0,
    "search": {
        "lr": {"low": 1.0e-3, "high": 5.0e-2, "log": True},
        "hidden": [8, 16],
        "warmup_epochs": {"low": 0, "high": 1},
    },
}


def tune_file(tmp_path, **overrides):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, **overrides}))
    return path


def load(name, storage):
    import optuna

    return optuna.load_study(study_name=name, storage=studies.open_storage(storage))


BAD = [  # (tune file overrides, tune() arguments, what the message must say)
    ({"search": {}}, {}, r"`search` must map parameters to ranges or lists"),
    (
        {"search": {"lr": {"low": 0.1}}},
        {},
        r"search.lr = \{'low': 0.1\}: expected a list of values or \{low",
    ),
    ({"search": {"lr": {"low": 0.1, "high": 0.01}}}, {}, r"search.lr = .*low < high"),
    (
        {"search": {"hidden": []}},
        {},
        r"search.hidden = \[\]: a categorical search is a non-empty list",
    ),
    (
        {"search": {"hiden": [8]}},
        {},
        r"search: \['hiden'\] not a report parameter or model argument.*'hidden'",
    ),
    ({"search": {"dataset": ["digits"]}}, {}, r"search: \['dataset'\] not a report parameter"),
    (
        {"search": {"optimizer": ["adam", "adamx"]}},
        {},
        r"search.optimizer = 'adamx': parameter optimizer = 'adamx'",
    ),
    (
        {"search": {"lr": {"low": 0.0, "high": 0.1}}},
        {},
        r"search.lr = 0.0: parameter lr = 0.0: must be > 0",
    ),
    ({"seq_len": [4, 8]}, {}, r"a study tunes one run, this file plans 2"),
    ({"pruner": "asha"}, {}, r"unknown pruner 'asha': valid values are \['median', 'hyperband'\]"),
    ({"prune_after": 0}, {}, r"prune_after = 0: expected a whole number of epochs from 1 .*epochs"),
    ({}, {"n_trials": 0}, r"--trials and --workers must be >= 1, got --trials 0"),
    (
        {},
        {"storage": "postgresql://seqlstm@127.0.0.1:9/optuna"},
        r"storage postgresql://seqlstm@127.0.0.1:9/optuna cannot be used: .*connection .*refused",
    ),
]


@pytest.mark.parametrize("overrides,kwargs,message", BAD, ids=[b[2][:40] for b in BAD])
def test_bad_tune_input_fails_before_any_trial(
    tmp_path, outputs, monkeypatch, overrides, kwargs, message
):
    monkeypatch.setattr(runner, "run_experiment", lambda *a, **k: pytest.fail("a trial started"))
    t = time.perf_counter()
    with pytest.raises((ValueError, files.SetupError), match=message):
        tune.tune(
            tune_file(tmp_path, **overrides),
            **{"n_trials": 2, "best": tmp_path / "best.yaml", **kwargs},
        )
    assert time.perf_counter() - t < 20 and not (tmp_path / "best.yaml").exists()


def test_tiny_study_writes_best_parameters_that_a_report_accepts_and_resumes(
    tmp_path, outputs, capsys
):
    best = tmp_path / "best_tiny.yaml"
    assert tune.tune(tune_file(tmp_path), n_trials=3, best=best) == 0
    storage = studies.storage_url()
    study = load("tiny", storage)
    assert [t.number for t in study.trials] == [0, 1, 2] and all(
        t.state.is_finished() for t in study.trials
    )
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("trial ")]
    assert len(lines) == 3 and "3/3 done" in lines[-1] and "0 left | best 0." in lines[-1]

    params = yaml.safe_load(best.read_text())  # papermill -f reads the file with PyYAML as it is
    assert (
        params["tune_study"] == "tiny"
        and params["model_args"]["hidden"] == study.best_params["hidden"]
    )
    assert params["lr"] == study.best_params["lr"] and "search" not in params
    runs = plan.plan_report({**schema.defaults(), **schema.read_params_file(best)}, schema.types())
    assert runs[0].params["lr"] == study.best_params["lr"] and runs[0].params["epochs"] == 2

    assert tune.tune(tune_file(tmp_path), n_trials=5, best=best) == 0  # the same study goes on
    study = load("tiny", storage)
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    client, experiment_id = tracking.Tracker("tiny").mlflow()
    runs = client.search_runs([experiment_id])
    parent = study.user_attrs["mlflow_parent_run_id"]
    trial_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent]
    assert len(trial_runs) == 5 and {r.data.tags["optuna.trial"] for r in trial_runs} == set(
        "01234"
    )
    assert all(r.data.tags["optuna.state"] in ("COMPLETE", "PRUNED") for r in trial_runs)
    assert all(len(client.get_metric_history(r.info.run_id, "val_acc")) >= 1 for r in trial_runs)
    assert {r.data.params["lr"] for r in trial_runs} == {str(t.params["lr"]) for t in study.trials}

    figs, table, states = report.tuning_figures("tiny")  # the report's Tuning section
    assert len(figs) == 3 and table.loc["trial", "best trial"] == study.best_trial.number


def images_of(notebook, starts):
    import nbformat

    cell = next(
        c for c in nbformat.read(notebook, as_version=4).cells if c.source.startswith(starts)
    )
    return sum(o.get("data", {}).get("text/html", "").count("<img alt=") for o in cell.outputs)


@pytest.mark.slow
def test_report_of_the_best_parameters_renders_tuning_and_variants(tmp_path, outputs):
    best = tmp_path / "best_tiny.yaml"
    tune.tune(tune_file(tmp_path, epochs=1), n_trials=2, best=best)
    variants = '{"adam": {}, "sgd": {"optimizer": "sgd", "lr": 0.05}}'
    executed, html = render.render_report(best, [("variants", variants)], out_dir=outputs)
    assert images_of(executed, "sections.show_variants") == 2  # the bars, the learning curves
    assert images_of(executed, "sections.show_tuning") == 3  # history, importances, coordinates
    text = html.read_text()
    assert "final_train_loss" in text and "sgd" in text and "Study <code>tiny</code>" in text


def test_a_bad_trial_is_pruned_and_tagged_pruned_not_failed(tmp_path, outputs):
    import optuna

    path = tune_file(tmp_path, epochs=3, search={"lr": {"low": 1.0e-7, "high": 0.1, "log": True}})
    study = optuna.create_study(
        study_name="tiny", storage=studies.open_storage(studies.storage_url()), direction="maximize"
    )
    for lr in (0.05, 0.03, 1e-7):  # two good trials, then one that cannot learn in an epoch
        study.enqueue_trial({"lr": lr})
    tune.tune(path, n_trials=3, best=tmp_path / "best.yaml")
    trials = load("tiny", studies.storage_url()).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert trials[2].params["lr"] == 1e-7 and list(trials[2].intermediate_values) == [
        1
    ]  # stopped after epoch 1
    client, _ = tracking.Tracker("tiny").mlflow()
    run = client.get_run(trials[2].user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "PRUNED"
    assert run.data.tags["seqlstm.status"] == "pruned"
    assert len(client.get_metric_history(run.info.run_id, "val_acc")) == 1


def test_prune_after_lets_every_trial_run_that_many_epochs_first(tmp_path, outputs):
    """A warm-up schedule or heavy augmentation starts slow: with prune_after 2 the trial that
    cannot learn is stopped after its second epoch, not its first."""
    import optuna

    search = {"lr": {"low": 1.0e-7, "high": 0.1, "log": True}}
    path = tune_file(tmp_path, epochs=3, search=search, prune_after=2)
    study = optuna.create_study(
        study_name="tiny", storage=studies.open_storage(studies.storage_url()), direction="maximize"
    )
    for lr in (0.05, 0.03, 1e-7):
        study.enqueue_trial({"lr": lr})
    tune.tune(path, n_trials=3, best=tmp_path / "best.yaml")
    trials = load("tiny", studies.storage_url()).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert list(trials[2].intermediate_values) == [1, 2]  # stopped after epoch 2


def tune_process(tmp_path, storage, *extra):
    env = {**os.environ, "SEQLSTM_OUTPUTS": str(tmp_path / "outputs")}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(
        [
            sys.executable,
            "seqlstm.py",
            "tune",
            str(tune_file(tmp_path, epochs=1)),
            "--trials",
            "4",
            "--storage",
            storage,
            "--study",
            "shared",
            "--best",
            str(tmp_path / "best.yaml"),
            *extra,
        ],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def check_shared_study(procs, storage):
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]
    trials = load("shared", storage).trials
    assert sorted(t.number for t in trials) == [
        0,
        1,
        2,
        3,
    ]  # exactly the requested trials, no duplicates
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers ran trials


@pytest.mark.slow
def test_two_workers_on_one_journal_file_run_exactly_the_requested_trials(tmp_path):
    journal = str(tmp_path / "outputs" / "shared.journal")
    check_shared_study([tune_process(tmp_path, journal, "--workers", "2")], journal)


def _postgres_bin():
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found and shutil.which("initdb"):
        found = [Path(shutil.which("initdb"))]
    return found[-1].parent if found else None


@pytest.fixture
def postgres():
    """A PostgreSQL server on 127.0.0.1 in a temporary directory (run as the postgres user when
    root)."""
    pytest.importorskip(
        "psycopg2", reason="psycopg2-binary (requirements.txt) is needed for PostgreSQL"
    )
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip(
            "no PostgreSQL server binaries (initdb) in /usr/lib/postgresql/*/bin or on PATH: "
            "apt-get install postgresql"
        )
    root = Path(
        tempfile.mkdtemp(prefix="seqlstm-pg-")
    )  # directly under /tmp: the postgres user can reach it
    as_user = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(root, "postgres")
        os.chmod(root, 0o755)
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    for cmd in (
        [str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
        [
            str(bin_dir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(root / "log"),
            "-w",
            "-o",
            f"-p {port} -k {root} -c listen_addresses=127.0.0.1",
            "start",
        ],
    ):
        proc = subprocess.run(as_user + cmd, capture_output=True, text=True)
        assert proc.returncode == 0, f"{cmd[0]}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    yield f"postgresql://postgres@127.0.0.1:{port}/postgres"  # as a user writes it
    subprocess.run(
        as_user + [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
        capture_output=True,
    )
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_two_tune_processes_share_one_study_in_postgresql(tmp_path, postgres):
    check_shared_study(
        [tune_process(tmp_path, postgres), tune_process(tmp_path, postgres)], postgres
    )


@pytest.mark.slow
def test_no_output_of_a_tune_and_its_report_holds_the_storage_password(tmp_path, postgres):
    """A study on a PostgreSQL server (trust authentication: any password is accepted, as with a
    password the server checks), then the report that shows it: the password is nowhere in what
    they print or write (notebook, HTML, MLflow store and artifacts, best-parameters file)."""
    storage = postgres.replace("postgresql://postgres@", "postgresql://postgres:SECRET@")
    worker = tune_process(tmp_path, storage)
    out, err = worker.communicate(timeout=600)
    assert worker.returncode == 0, err[-3000:]
    best = (tmp_path / "best.yaml").read_text()
    assert "tune_storage" in best and "SECRET" not in best
    env = {**os.environ, "SEQLSTM_OUTPUTS": str(tmp_path / "outputs")}
    env.pop("MLFLOW_TRACKING_URI", None)
    shown = subprocess.run(
        [sys.executable, "seqlstm.py", "report", "params/smoke.yaml", "-p", "seq_len", "2", "-p",
         "tune_study", "shared", "-p", "tune_storage", storage],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert ">Tuning<" in (tmp_path / "outputs" / "smoke.html").read_text()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 10 and [str(p) for p in written if b"SECRET" in p.read_bytes()] == []
    assert "SECRET" not in out + err + shown.stdout + shown.stderr
