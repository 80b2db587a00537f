"""Trust: nothing from data or parameters executes, a password is never written down, a broken
cache file is set aside and rebuilt, a switch is a boolean."""

import pytest
import torch

from seqlab import files, plan, render, schema, teacher, tracking, tune


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
