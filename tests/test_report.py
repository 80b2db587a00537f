"""End to end: the papermill report on params/smoke.yaml, its HTML, summary.csv and MLflow."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from seqlab import plan, render, schema, tune

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
BIN = Path(PYTHON).parent


def env_for(tmp_path):
    return {
        **os.environ,
        "SEQLSTM_OUTPUTS": str(tmp_path / "outputs"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }


def outputs_of(nb, kind):
    return [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if kind in o.get("data", {})
    ]


def smoke_report(tmp_path, **params):
    """`seqlstm.py report params/smoke.yaml -p KEY VALUE ...`: (its summary.csv rows, the Markdown
    its notebook displayed)."""
    cmd = [PYTHON, "seqlstm.py", "report", "params/smoke.yaml"]
    for key, value in params.items():
        cmd += ["-p", key, str(value)]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env_for(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "outputs" / "summary.csv")))
    nb = nbformat.read(tmp_path / "outputs" / "smoke.ipynb", as_version=4)
    return rows, "".join(o["data"]["text/markdown"] for o in outputs_of(nb, "text/markdown"))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    proc = subprocess.run(
        [PYTHON, "seqlstm.py", "report", "params/smoke.yaml"],
        cwd=ROOT,
        env=env_for(tmp),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp / "terminal.txt").write_text(proc.stdout)
    return tmp


def test_report_renders_classification_reports_and_confusion_matrices(smoke):
    nb = nbformat.read(smoke / "outputs" / "smoke.ipynb", as_version=4)
    tables = [o["data"]["text/html"] for o in outputs_of(nb, "text/html")]
    reports = [t for t in tables if "precision" in t and "recall" in t and "macro avg" in t]
    assert len(reports) == 2  # one per seq_len of smoke.yaml
    images = sum(t.count("<img alt=") for t in tables)
    assert (
        images >= 2 * 3 + 1
    )  # sequence, learning curves, confusion matrix per run; the summary plot
    html = (smoke / "outputs" / "smoke.html").read_text()
    assert "confusion matrix" in html and "macro avg" in html and '<img alt="' in html


def test_the_html_reads_like_a_paper(smoke):
    page = (smoke / "outputs" / "smoke.html").read_text()
    html = page[page.index("<body") :]  # the page, not its style sheet
    assert (
        "hl-ipython3" not in html and "prepare_report" not in html and "import " not in html
    )  # no code
    results, runs = html.index(">Results<"), html.index(">Runs<")
    assert html.index("Training log") < results < runs < html.index("Appendix: parameters")
    assert html.count("<img") == html.count('<img alt="') > 0  # every figure carries alt text
    assert f"<details><summary>All {len(schema.PARAMS)} parameters</summary>" in html
    assert ">Distillation<" not in html and ">Tuning<" not in html  # nothing to show: left out
    assert "epoch   1/3" not in html.split("Training log")[0] and "epoch   1/3" in html  # folded


def test_the_terminal_gets_text_lines_not_object_reprs(smoke):
    out = (smoke / "terminal.txt").read_text()
    assert "== run 1/2: digits, identity, L = 2" in out and "test accuracy " in out
    assert "<IPython" not in out and "<pandas" not in out and "<Figure" not in out
    lines = out.splitlines()
    epochs = [i for i, line in enumerate(lines) if line.startswith("epoch ")]
    assert len(epochs) == 6 and all(b == a + 1 for a, b in zip(epochs[:2], epochs[1:3]))


def test_report_appends_summary_rows(smoke):
    rows = list(csv.DictReader(open(smoke / "outputs" / "summary.csv")))
    assert [r["seq_len"] for r in rows] == ["2", "4"]
    for r in rows:
        assert (
            r["dataset"] == "digits" and r["model"] == "bilstm_fc" and r["transform"] == "identity"
        )
        assert 0.5 < float(r["test_acc"]) <= 1 and 0 < float(r["macro_f1"]) <= 1
        assert (
            int(r["n_params"]) > 0
            and float(r["train_images_per_s"]) > 0
            and len(r["mlflow_run_id"]) == 32
        )


def test_report_tracks_every_run_in_mlflow(smoke):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{smoke / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    for run in runs:
        assert 0 < run.data.metrics["test_acc"] <= 1 and "macro_f1" in run.data.metrics
        assert run.data.params["dataset"] == "digits" and run.data.params["epochs"] == "3"
        assert len(client.get_metric_history(run.info.run_id, "val_acc")) == 3  # one per epoch
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"classification_report.json", "confusion_matrix.png", "params.yaml"} <= artifacts
        report = json.loads(
            Path(
                client.download_artifacts(run.info.run_id, "classification_report.json")
            ).read_text()
        )
        assert report["accuracy"] == pytest.approx(run.data.metrics["test_acc"])


def test_plain_papermill_and_nbconvert_route(tmp_path):
    out = tmp_path / "out.ipynb"
    cmd = [
        str(BIN / "papermill"),
        "report.ipynb",
        str(out),
        "-p",
        "seq_len",
        "3",
        "-p",
        "dataset",
        "digits",
        "-p",
        "epochs",
        "1",
        "-p",
        "limit_train",
        "300",
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env_for(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "outputs" / "summary.csv")))
    assert [(r["seq_len"], r["epochs"]) for r in rows] == [
        ("3", "1")
    ]  # a scalar seq_len is one run
    proc = subprocess.run(
        [str(BIN / "jupyter"), "nbconvert", "--to", "html", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "macro avg" in (tmp_path / "out.html").read_text()


def test_unknown_parameter_is_an_error(tmp_path):
    proc = subprocess.run(
        [str(BIN / "papermill"), "report.ipynb", str(tmp_path / "o.ipynb"), "-p", "seq_lenn", "3"],
        cwd=ROOT,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "unknown parameter(s) ['seq_lenn']" in proc.stderr + proc.stdout
    assert not (tmp_path / "outputs" / "summary.csv").exists()  # stopped before any training


def test_cli_rejects_unknown_parameter_before_running(tmp_path):

    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['epoch'\].*'epochs'"):
        render.render_report("params/smoke.yaml", [("epoch", "2")], out_dir=tmp_path)
    assert not list(tmp_path.iterdir())


def test_notebook_is_committed_clean_with_a_parameters_cell():
    nb = nbformat.read(ROOT / "report.ipynb", as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)


def test_params_files_only_override_known_parameters():
    import yaml

    known = schema.defaults()
    for path in (ROOT / "params").glob("*.yaml"):
        given = yaml.safe_load(path.read_text())
        if "search" in given:  # a tune file: report parameters plus its search space, checked whole
            tune.read_tune_file(path)
        else:
            schema.check_params(given, known)
    assert known["dataset"] == "cifar10" and known["seq_len"] == [
        5,
        10,
        20,
    ]  # defaults are the test task


def test_report_runs_across_datasets_and_transforms(tmp_path):
    if not (ROOT / "data" / "MNIST" / "raw").is_dir() and "SEQLSTM_DATA" not in os.environ:
        pytest.skip("MNIST copy missing: unpack ../shared/data/mnist.tar.gz into data/")
    rows, markdown = smoke_report(
        tmp_path,
        dataset="[digits, mnist]",
        transform="[identity, rows]",
        seq_len="[2]",
        epochs=1,
        limit_train=300,
        overview_per_class=2,
    )
    assert [(r["dataset"], r["transform"], r["seq_len"]) for r in rows] == [
        ("digits", "identity", "2"),
        ("digits", "rows", "8"),
        ("mnist", "identity", "2"),
        ("mnist", "rows", "28"),
    ]
    assert (
        "### digits: 10 classes" in markdown and "### mnist: 10 classes" in markdown
    )  # data overviews
    assert "Across transforms" in markdown  # the written comparison


def test_report_compares_models_with_per_model_overrides(tmp_path):
    rows, markdown = smoke_report(
        tmp_path,
        model="[lstm, gru]",
        transform="rows",
        epochs=1,
        limit_train=300,
        per_model="{gru: {epochs: 2, grad_clip: 1.0, model_args: {hidden: 8}}}",
        overview_per_class=0,
    )
    assert [(r["model"], r["epochs"]) for r in rows] == [("lstm", "1"), ("gru", "2")]
    assert int(rows[1]["n_params"]) < int(rows[0]["n_params"])  # gru's hidden 8 applied to gru only
    assert "### digits, gru, rows" in markdown and "Across models" in markdown


def test_per_model_overrides_are_checked():

    types = schema.types()
    params = dict(
        schema.defaults(), model=["lstm", "gru"], per_model={"gru": {"lr": 0.01}}, seq_len=5
    )
    runs = {r.model: r.params for r in plan.plan_report(params, types)}
    assert runs["gru"]["lr"] == 0.01 and runs["lstm"]["lr"] == 0.002
    assert (
        plan.plan_report({**params, "per_model": {"pit": {"epochs": 1}}}, types)[1].params["epochs"]
        == 30
    )
    with pytest.raises(ValueError, match="which are not models: valid names are"):
        plan.plan_report({**params, "per_model": {"gruu": {"epochs": 1}}}, types)
    with pytest.raises(ValueError, match=r"per_model\['gru'\]: unknown parameter\(s\) \['epoch'\]"):
        plan.plan_report({**params, "per_model": {"gru": {"epoch": 1}}}, types)


def test_an_image_model_reads_the_channels_of_its_images(quick_report):
    """digits is grayscale: the image models get channels 1 (without it the rows of 8 values do
    not fold into 3-channel images: 8 is not a multiple of 3), a model_args value is kept, and a
    model without the argument is left alone."""
    runs, _ = quick_report(
        model=["vanilla_sequencer", "vit_small_seq", "lstm"],
        transform="rows",
        per_model={"vit_small_seq": {"model_args": {"channels": 1, "patch_size": 2}}},
    )
    by_model = {r.model: r.network.model_args for r in runs}
    assert by_model == {
        "vanilla_sequencer": {"channels": 1},
        "vit_small_seq": {"channels": 1, "patch_size": 2},
        "lstm": {},
    }


def test_per_dataset_overrides_apply_to_their_dataset_only(quick_report):
    """per_dataset sets a parameter for one dataset's runs (MNIST without flips); a name that is no
    dataset fails, naming the valid ones."""
    runs, _ = quick_report(per_dataset={"digits": {"augment": "none"}, "mnist": {"epochs": 2}})
    assert [(r.dataset, r.train.augment, r.train.epochs) for r in runs] == [("digits", "none", 1)]
    with pytest.raises(schema.ParamError, match=r"per_dataset names \['mnsit'\].*'mnist'"):
        quick_report(per_dataset={"mnsit": {"augment": "none"}})
    with pytest.raises(schema.ParamError, match=r"per_dataset\['mnist'\].*augment"):
        quick_report(per_dataset={"mnist": {"augment": "sideways"}})
