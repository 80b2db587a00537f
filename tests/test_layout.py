"""The shape of the project: one parameter schema that the notebook and the command line agree
with, a thin seqlstm.py that imports no tracking, search or notebook library, a package that
imports it (never the reverse), one module for every MLflow call, typed runs."""

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill as pm

from seqlab import plan, schema

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "seqlab"


def test_the_notebooks_parameters_cell_is_the_schemas():
    nb = nbformat.read(ROOT / "report.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert cell.source == schema.parameters_cell(), "run `python -m seqlab.schema` to rewrite it"
    inferred = pm.inspect_notebook(
        str(ROOT / "report.ipynb")
    )  # what papermill --help-notebook shows
    assert list(inferred) == [p.name for p in schema.PARAMS]
    for p in schema.PARAMS:
        assert inferred[p.name]["inferred_type_name"] == p.type
        assert ast.literal_eval(inferred[p.name]["default"]) == p.default
        assert inferred[p.name]["help"] == p.help


def test_a_changed_schema_no_longer_matches_the_cell(monkeypatch):
    changed = (*schema.PARAMS[:-1], dataclasses.replace(schema.PARAMS[-1], default=False))
    monkeypatch.setattr(schema, "PARAMS", changed)
    nb = nbformat.read(ROOT / "report.ipynb", as_version=4)
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    assert cell.source != schema.parameters_cell()


def test_importing_seqlstm_imports_no_tracking_search_notebook_or_training_library():
    code = (
        "import sys, seqlstm; print(sorted(m for m in ('mlflow', 'optuna', 'papermill', "
        "'pytorch_lightning', 'seqlab', 'IPython') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def _imports(path: Path, skip_main=False):
    tree = ast.parse(path.read_text())
    nodes = [
        n for n in tree.body if not (skip_main and isinstance(n, ast.If))
    ]  # the __main__ hand-off
    found = set()
    for node in (n for top in nodes for n in ast.walk(top)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_seqlstm_never_imports_the_package_and_one_module_talks_to_mlflow():
    assert "seqlab" not in _imports(ROOT / "seqlstm.py", skip_main=True)
    assert "seqlab" in _imports(ROOT / "seqlstm.py")  # `python seqlstm.py CMD` hands off to it
    talking = sorted(p.stem for p in PACKAGE.glob("*.py") if "mlflow" in _imports(p))
    assert talking == ["tracking"]


def test_every_parameter_reaches_a_run_as_a_typed_field():
    views = {
        "data": plan.DataSpec,
        "sequence": plan.SequenceSpec,
        "model": plan.ModelSpec,
        "train": plan.TrainSpec,
        "distill": plan.DistillSpec,
        "compute": plan.ComputeSpec,
    }
    for group, cls in views.items():
        named = {p.name for p in schema.PARAMS if p.group == group}
        assert named <= {f.name for f in dataclasses.fields(cls)}, group
    assert {p.group for p in schema.PARAMS} == {*views, "report"}
    run = plan.plan_report({**schema.defaults(), "seq_len": 5})[0]
    assert run.train.lr == 0.002 and run.sequence.seq_len == 5 and run.network.model == "bilstm_fc"
    assert run.data.key == plan.Run(dict(run.params)).data.key and run.compute.world_size == 1


def test_both_spellings_of_the_command_line_agree():
    old = subprocess.run(
        [sys.executable, "seqlstm.py", "models"], cwd=ROOT, capture_output=True, text=True
    )
    new = subprocess.run(
        [sys.executable, "-m", "seqlab", "models"], cwd=ROOT, capture_output=True, text=True
    )
    assert old.returncode == new.returncode == 0 and old.stdout == new.stdout
    assert "bilstm_fc" in old.stdout
