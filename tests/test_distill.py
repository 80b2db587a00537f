"""Knowledge distillation: a teacher trained once and cached, its logits looked up or computed live
for the very batch the student sees, the teacher untouched by the student's steps, the undistilled
twin planned beside each student, and a distillation report end to end."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import torch

import seqlstm
from seqlab import lightning, plan, report, runner, schema, teacher, tracking

ROOT = Path(__file__).resolve().parents[1]
K = 10
TEACHER = {"experiment": "distill", "teacher": "fast_cnn", "teacher_epochs": 1}  # over QUICK


@pytest.fixture
def planned(quick_report):
    """plan(**overrides): the quick report of conftest, distilled from a one-epoch teacher."""
    return lambda **overrides: quick_report(**{**TEACHER, **overrides})


def images(n=24, shape=(3, 8, 8), seed=0):
    return torch.randint(
        0, 256, (n, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def tiny_teacher(shape=(3, 8, 8), seed=0):
    """An untrained fast_cnn whose batch-norm statistics are those of `images()` (fresh ones would
    give nearly the same logits for every image) and whose logits spread over a few units."""
    torch.manual_seed(seed)
    model, to_input = seqlstm.build_teacher("fast_cnn", {}, shape, K)
    mean, std = torch.full((shape[0],), 0.4), torch.full((shape[0],), 0.3)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a cumulative average: one batch sets the statistics
    with torch.no_grad():
        model.train()(seqlstm.normalize(images(shape=shape, seed=9), mean, std))
        model.head.weight *= 20
    return seqlstm.Teacher(model, to_input, mean, std)


# ---- the batch the student sees, and the teacher's logits for it


@pytest.mark.parametrize("augment", seqlstm.AUGMENTS)
def test_flip_flags_say_which_images_were_mirrored(augment):
    x = images()
    out, flip = seqlstm.augment_with_flips(x, augment, torch.Generator().manual_seed(1))
    assert torch.equal(out, seqlstm.augment_batch(x, augment, torch.Generator().manual_seed(1)))
    if augment == "flip":
        assert 0 < flip.sum() < len(x)
        assert torch.equal(out[flip], x[flip].flip(3)) and torch.equal(out[~flip], x[~flip])
    assert (flip is None) == ("flip" not in augment)


def test_batches_carry_their_indices():
    x, y = images(), torch.arange(24)
    for xb, yb, idx in seqlstm.Batches(x, y, 5, shuffle=True, seed=2, with_index=True):
        assert torch.equal(xb, x[idx]) and torch.equal(yb, idx)


def test_cached_logits_equal_the_live_teachers_for_flipped_and_unflipped_images():
    live, x = tiny_teacher(), images()
    table = seqlstm.logits_table(live, x, batch=7)
    assert table.shape == (24, 2, K) and table.dtype == torch.float16
    assert table.float().std(0).mean() > 0.5  # logits that tell images apart
    cached = seqlstm.Teacher(live.model, live.to_input, live.mean, live.std, table=table)
    idx = torch.randperm(24)[:16]
    seen, flip = seqlstm.augment_with_flips(x[idx], "flip", torch.Generator().manual_seed(0))
    assert 0 < flip.sum() < 16
    torch.testing.assert_close(
        cached.logits(seen, idx, flip), live.logits(seen), atol=2e-2, rtol=1e-2
    )
    torch.testing.assert_close(
        cached.logits(x[idx], idx, None), live.logits(x[idx]), atol=2e-2, rtol=1e-2
    )
    assert not torch.allclose(
        cached.logits(seen, idx, ~flip), live.logits(seen), atol=2e-2, rtol=1e-2
    )


def test_moved_shifts_one_pixel_sideways_reflecting_the_edge():
    z = torch.arange(4.0).view(1, 1, 1, 4)
    assert seqlstm._moved(z, 0).flatten().tolist() == [1, 0, 1, 2]  # right; the left edge reflected
    assert seqlstm._moved(z, 2).flatten().tolist() == [1, 2, 3, 2]  # left


@pytest.mark.parametrize("tta", seqlstm.TEST_VIEWS)
def test_test_time_views_average_the_models_logits(tta):
    t, x = tiny_teacher(), images()
    t.tta = tta
    z = seqlstm.normalize(x, t.mean, t.std)
    views = seqlstm.TEST_VIEWS[tta](z)
    assert sum(w for w, _ in views) == pytest.approx(1.0)
    with torch.no_grad():
        expected = sum(w * t.model(v) for w, v in views)
        torch.testing.assert_close(t.live(x), expected)
        mirrored = torch.allclose(t.live(x.flip(3)), t.live(x), atol=1e-4)
        assert mirrored == (tta != "none")  # with the mirror among the views, one answer for both
        if tta != "none":
            assert not torch.allclose(t.live(x), t.model(z), atol=1e-2)


def test_a_mirror_invariant_teachers_table_is_computed_once_and_matches_live():
    t, x = tiny_teacher(), images()
    t.tta = "flip_shift"
    calls = []
    t.model.register_forward_hook(lambda *a: calls.append(1))
    table = seqlstm.logits_table(t, x, batch=8)
    assert len(calls) == 3 * 6  # 3 batches x 6 views: the mirrored column is not computed again
    cached = seqlstm.Teacher(t.model, t.to_input, t.mean, t.std, table=table, tta="flip_shift")
    flip = torch.arange(24) % 2 == 0
    seen = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    torch.testing.assert_close(
        cached.logits(seen, torch.arange(24), flip), t.live(seen), atol=2e-2, rtol=1e-2
    )


def test_a_student_step_leaves_the_teacher_untouched():
    t = tiny_teacher()
    before = {
        k: v.clone() for k, v in t.model.state_dict().items()
    }  # weights and batch-norm statistics
    student = seqlstm.create_model("bilstm_fc", in_features=3 * 8 * 8, num_classes=K)
    module = lightning.SeqClassifier(
        student,
        to_seq=seqlstm.make_sequence("identity", seq_len=3),
        mean=t.mean,
        std=t.std,
        augment="flip_crop",
        teacher=t,
        distill_alpha=0.5,
        distill_T=2.0,
    )
    module.train()  # what Lightning does before each training epoch
    opt = torch.optim.SGD(module.parameters(), lr=1.0)
    x, y = images(), torch.arange(24) % K
    for _ in range(2):
        loss, _ = module.train_loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not t.model.training
    assert all(p.grad is None for p in t.model.parameters())
    after = t.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(
        k.startswith("teacher") for k in module.state_dict()
    )  # not saved with the student
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


# ---- planning: the undistilled twin, the sweep, bad input


def test_each_student_is_planned_beside_its_undistilled_twin_once(quick_report):
    types = schema.types()
    params = {
        **schema.defaults(),
        **quick_report.params,
        **TEACHER,
        "seq_len": [4, 8],
        "distill_T": [2, 4],
        "extra_runs": [{"seq_len": 8, "distill_hard": True, "distill_T": [2, 4]}],
    }
    runs = plan.plan_report(params, types)
    settings = [
        (r.seq_len, r.params["teacher"], r.params["distill_T"], r.params["distill_hard"])
        for r in runs
    ]
    assert settings == [
        (4, "", 2.0, False),
        (4, "fast_cnn", 2.0, False),
        (4, "fast_cnn", 4.0, False),
        (8, "", 2.0, False),
        (8, "fast_cnn", 2.0, False),
        (8, "fast_cnn", 4.0, False),
        (8, "fast_cnn", 2.0, True),
    ]  # the twin of L = 8 and the hard run (no T) once each
    data = seqlstm.load_dataset("digits")
    twin, distilled = runs[0].params, runs[1].params
    assert tracking.run_key(twin, data) == tracking.run_key({**twin, "distill_alpha": 0.1}, data)
    assert tracking.run_key(distilled, data) != tracking.run_key(
        {**distilled, "distill_alpha": 0.1}, data
    )


BAD = [
    (
        {"teacher": "resnet"},
        r"parameter teacher = 'resnet': valid values are \['', 'bilstm_fc'.*'fast_cnn'",
    ),
    ({"distill_alpha": 1.5}, r"parameter distill_alpha = 1.5: must be between 0 and 1"),
    ({"distill_alpha": [0.5, -0.1]}, r"parameter distill_alpha = -0.1: must be between 0 and 1"),
    ({"distill_T": 0}, r"parameter distill_T = 0.0: must be > 0"),
    ({"teacher_epochs": 0}, r"parameter teacher_epochs = 0: must be >= 1"),
    ({"model": []}, r"teacher = 'fast_cnn' is set but model names no student"),
    (
        {"teacher_args": {"width": 8}},
        r"teacher_args \{'width': 8\} for teacher 'fast_cnn' on 1x8x8 images",
    ),
    (
        {"extra_runs": [{"distill_T": -1}]},
        r"extra_runs\[0\]: parameter distill_T = -1.0: must be > 0",
    ),
    ({"extra_runs": [{"seq_lenn": 3}]}, r"extra_runs\[0\]: unknown parameter\(s\) \['seq_lenn'\]"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_distillation_input_fails_before_any_run(
    outputs, monkeypatch, planned, overrides, message
):
    monkeypatch.setattr(teacher, "train_teacher", lambda *a, **k: pytest.fail("a teacher trained"))
    monkeypatch.setattr(runner, "run_experiment", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(ValueError, match=message):
        planned(**overrides)


# ---- the teacher: trained once, cached, found again


def test_the_cached_teacher_is_reused_not_retrained(outputs, monkeypatch, capsys, planned):
    runs, loaded = planned()
    data = loaded[runs[1].data.key]
    fits = []
    fit = teacher._fit_teacher
    monkeypatch.setattr(teacher, "_fit_teacher", lambda *a: fits.append(1) or fit(*a))
    first = teacher.teacher_for(runs[1], data)
    again = teacher.teacher_for(runs[1], data)  # from the cache folder
    assert len(fits) == 1 and again.info["key"] == first.info["key"]
    assert all(
        torch.equal(a, b)
        for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values())
    )
    assert torch.equal(again.table, first.table)
    cached = next((outputs.parent / "cache" / "teachers").iterdir())
    cached.unlink()  # another machine: an empty cache, the same tracking server
    fetched = teacher.teacher_for(runs[1], data)
    assert len(fits) == 1 and torch.equal(fetched.table, first.table) and cached.exists()

    saved = teacher._read_teacher(cached, data)  # a cache entry made for other classes
    saved["info"]["classes"] = saved["info"]["classes"][:5]
    teacher._save_teacher(saved, cached)
    teacher.teacher_for(runs[1], data)  # said, and fetched again from MLflow
    assert len(fits) == 1 and "training it again" in capsys.readouterr().out
    assert teacher._read_teacher(cached, data)["info"]["classes"] == data.classes
    teacher._save_teacher(saved, cached)
    monkeypatch.setenv(
        "MLFLOW_TRACKING_URI", f"sqlite:///{outputs / 'other.db'}"
    )  # and no MLflow copy either
    teacher.teacher_for(runs[1], data)
    assert len(fits) == 2 and "training it again" in capsys.readouterr().out


def test_distilled_run_tags_its_teachers_key_and_differs_from_its_twin(outputs, planned):
    runs, loaded = planned(augment="flip_crop")  # crops: the teacher runs live
    results = [runner.run_experiment(r, loaded[r.data.key]) for r in runs]
    assert [r.status for r in results] == ["ok", "ok"]
    twin, distilled = results
    client, _ = tracking.Tracker("distill").mlflow()
    tags = client.get_run(distilled.row["mlflow_run_id"]).data.tags
    assert (
        tags["seqlstm.teacher_key"] == distilled.teacher["key"]
        and len(distilled.teacher["preds"]) == 360
    )
    assert "seqlstm.teacher_key" not in client.get_run(twin.row["mlflow_run_id"]).data.tags
    assert twin.history[0]["train_loss"] != distilled.history[0]["train_loss"]
    table = report.distillation_table(results)
    assert list(table["without"]) == [twin.row["test_acc"]] and len(table) == 1


@pytest.mark.slow
def test_distillation_report_end_to_end(tmp_path):
    env = {
        **os.environ,
        "SEQLSTM_OUTPUTS": str(tmp_path / "outputs"),
        "SEQLSTM_CACHE": str(tmp_path / "cache"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    cmd = [
        sys.executable,
        "seqlstm.py",
        "report",
        "params/smoke.yaml",
        "-p",
        "teacher",
        "fast_cnn",
        "-p",
        "teacher_epochs",
        "4",
        "-p",
        "seq_len",
        "[2]",
        "-p",
        "distill_alpha",
        "[0.5, 0.9]",
        "-p",
        "overview_per_class",
        "0",
        "-p",
        "threads",
        "1",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "outputs" / "summary.csv")))
    assert [r["teacher"] for r in rows] == [
        "",
        "fast_cnn (α = 0.5, T = 4)",
        "fast_cnn (α = 0.9, T = 4)",
    ]
    nb = nbformat.read(tmp_path / "outputs" / "smoke.ipynb", as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code" and "show_distillation" in c.source)
    shown = json.dumps(cell.outputs)
    assert (
        "Teacher `fast_cnn` on digits: test accuracy" in shown and "precision" in shown
    )  # its per-class report
    assert '<img alt=\\"teacher fast_cnn: confusion matrix' in shown  # and its confusion matrix
    assert "gain (points)" in shown and "agreement" in shown and "classes up" in shown


def test_two_outputs_sharing_one_teacher_cache_train_the_teacher_once(
    outputs, monkeypatch, planned, tmp_path
):
    """The teacher's lock lives beside the cache: while another report (its own outputs/) holds
    it, this one waits rather than training the same teacher at the same time."""
    import threading

    from filelock import FileLock

    runs, loaded = planned()
    data = loaded[runs[1].data.key]
    key = teacher.teacher_key(runs[1], data)
    held = FileLock(str(tmp_path / "cache" / ".locks" / f"teacher-{key}.lock"))
    looked = []  # the first step under the lock: reading the cache folder
    read = teacher._read_teacher
    monkeypatch.setattr(teacher, "_read_teacher", lambda *a: looked.append(1) or read(*a))
    with held:
        monkeypatch.setenv("SEQLSTM_OUTPUTS", str(tmp_path / "other_outputs"))
        worker = threading.Thread(target=teacher.teacher_for, args=(runs[1], data))
        worker.start()
        worker.join(timeout=3)
        assert worker.is_alive() and looked == []  # waiting on the other report's lock
    worker.join(timeout=120)
    assert not worker.is_alive() and looked == [1]


def test_students_with_different_limit_train_share_one_teacher_of_the_whole_split(
    outputs, monkeypatch, planned
):
    """limit_train cuts the student's training images, not the teacher's: two reports with
    different limits train one teacher, on every training image, and each student's table holds
    the logits of its own images (the whole split's first N)."""
    fitted = []
    fit = teacher._fit_teacher
    monkeypatch.setattr(
        teacher, "_fit_teacher", lambda run, data, *a: fitted.append(data) or fit(run, data, *a)
    )
    runs, loaded = planned()
    whole = loaded[runs[1].data.key]
    taught = []
    for limit in (300, 500):
        runs, loaded = planned(limit_train=limit)
        data = loaded[runs[1].data.key]
        taught.append(teacher.teacher_for(runs[1], data))
        assert len(taught[-1].table) == limit == len(data.train_y)
    assert len(fitted) == 1 and len(fitted[0].train_y) > 500  # the whole training split
    assert taught[0].info["key"] == taught[1].info["key"]
    assert torch.equal(taught[1].table[:300], taught[0].table)
    live = taught[0].live(whole.train_x[:300])  # the table's rows are the first 300 images'
    assert torch.allclose(taught[0].table[:, 0].float(), live, atol=0.02, rtol=0.01)
