"""Seeds as a dimension of a report: one run per training seed and configuration, a split seed that
keeps the split (and the teacher) fixed across training seeds, the statistics of repeated runs
(held against scipy.stats), comparisons paired by seed, and `tune` on a rows model."""

import math
import random

import pytest
import torch
import yaml
from scipy import stats as sps

from seqlab import plan, report, runner, schema, stats, teacher, tune
from test_report import smoke_report

# ---- planning


def test_a_list_of_seeds_plans_one_run_per_seed_and_configuration_seed_major(quick_report):
    runs, _ = quick_report(seed=[3, 1, 2], seq_len=[2, 4])
    assert [(r.train.seed, r.seq_len) for r in runs] == [
        (3, 2), (3, 4), (1, 2), (1, 4), (2, 2), (2, 4)
    ]  # fmt: skip
    assert len({r.config for r in runs}) == 2 and len({r.train.seed for r in runs}) == 3
    assert "seed 1" in runs[2].title(with_seed=True) and "seed" not in runs[2].title()


def test_a_seed_listed_twice_runs_once(quick_report):
    runs, _ = quick_report(seed=[0, 0, 1])
    assert [r.train.seed for r in runs] == [0, 1]


def test_a_variant_may_not_change_the_seeds(quick_report):
    with pytest.raises(schema.ParamError, match=r"variants\['other'\]: unknown parameter.*seed"):
        quick_report(seed=[0, 1], variants={"other": {"seed": 5}})


def test_the_split_is_fixed_across_training_seeds_and_follows_the_split_seed(quick_report):
    runs, loaded = quick_report(seed=[0, 1])
    assert runs[0].data.key == runs[1].data.key  # one split for both training seeds
    moved, loaded2 = quick_report(seed=[0, 1], split_seed=1)
    a, b = loaded[runs[0].data.key], loaded2[moved[0].data.key]
    assert a.train_y.shape == b.train_y.shape
    assert not torch.equal(a.val_x, b.val_x)  # another split seed: other validation images
    again, loaded3 = quick_report(seed=[5])
    assert torch.equal(loaded3[again[0].data.key].val_x, a.val_x)


def test_training_seeds_differ_in_initialisation_and_batch_order(quick_report, outputs):
    runs, loaded = quick_report(seed=[0, 1])
    data = loaded[runs[0].data.key]
    first = []
    for run in runs:  # fit_run seeds, builds and trains: the first weights and the first batch
        fit = runner.fit_run(run, data, None, "")
        first.append(fit.module.history[0]["train_loss"])
    assert first[0] != first[1]


def test_a_distilled_report_with_three_seeds_trains_one_teacher(quick_report, outputs, monkeypatch):
    runs, loaded = quick_report(
        experiment="distill", teacher="fast_cnn", teacher_epochs=1, seed=[0, 1, 2]
    )
    students = [r for r in runs if r.distill.teacher]
    assert [r.train.seed for r in students] == [0, 1, 2]
    fits = []
    fit = teacher._fit_teacher
    monkeypatch.setattr(teacher, "_fit_teacher", lambda *a: fits.append(1) or fit(*a))
    keys = {teacher.teacher_for(r, loaded[r.data.key]).info["key"] for r in students}
    assert len(fits) == 1 and len(keys) == 1


# ---- statistics, against scipy.stats on fixed numbers

A = [0.512, 0.498, 0.505, 0.521, 0.509]
B = [0.484, 0.490, 0.479, 0.497, 0.488]


def test_spread_is_the_mean_sd_and_students_t_interval():
    s = stats.spread(A)
    mean, sem = sum(A) / 5, sps.sem(A)
    low, high = sps.t.interval(0.95, 4, loc=mean, scale=sem)
    assert s.n == 5 and s.mean == pytest.approx(mean) and s.sd == pytest.approx(sps.tstd(A))
    assert (s.low, s.high) == (pytest.approx(low), pytest.approx(high))
    assert stats.spread([1, 2, 3, 4, 5]).low == pytest.approx(3 - 2.7764451 * 1.5811388 / 5**0.5)
    one = stats.spread([0.5])
    assert one.n == 1 and math.isnan(one.sd) and math.isnan(one.low)
    assert "one seed" in one.text() and "n = 5; 95% CI" in s.text()


def test_paired_difference_its_interval_and_p_value_match_scipy():
    d = stats.paired(dict(enumerate(A)), dict(enumerate(B)))
    diffs = [a - b for a, b in zip(A, B)]
    low, high = sps.t.interval(0.95, 4, loc=sum(diffs) / 5, scale=sps.sem(diffs))
    assert d.n == 5 and d.diff == pytest.approx(sum(diffs) / 5)
    assert (d.low, d.high) == (pytest.approx(low), pytest.approx(high))
    assert d.p == pytest.approx(sps.ttest_rel(A, B).pvalue) and d.verdict == "better"
    assert stats.paired(dict(enumerate(B)), dict(enumerate(A))).verdict == "worse"


def test_the_comparison_pairs_by_seed_not_by_position():
    a = {s: v for s, v in zip([0, 1, 2, 3, 4], A)}
    b = {s: v for s, v in zip([0, 1, 2, 3, 4], B)}
    shuffled = dict(zip([3, 0, 4, 1, 2], B))  # the same values under other seeds
    assert stats.paired(a, b).p != pytest.approx(stats.paired(a, shuffled).p)
    assert stats.paired(a, b).diff == pytest.approx(stats.paired(a, shuffled).diff)
    partial = stats.paired(a, {0: B[0], 4: B[4], 9: 0.1})  # only the seeds both ran
    assert partial.n == 2


def test_verdicts_for_noise_identical_shifts_and_too_few_seeds():
    rng = random.Random(0)
    noise = {s: 0.5 + rng.gauss(0, 0.01) for s in range(5)}
    other = {s: 0.5 + rng.gauss(0, 0.01) for s in range(5)}
    assert stats.paired(noise, other).verdict == "no detectable difference"
    exact = {s: 0.5 + s / 64 for s in range(5)}  # binary fractions: differences without rounding
    same = stats.paired({s: v + 0.125 for s, v in exact.items()}, exact)  # no variance at all
    assert same.verdict == "better" and same.p == 0 and same.low == same.high == 0.125
    assert stats.paired({0: 0.6}, {0: 0.5}).verdict == "too few seeds"


# ---- comparisons in a report


class Done:
    def __init__(self, acc, seq_len):
        self.status, self.row = "ok", {"test_acc": acc, "seq_len": seq_len, "macro_f1": acc}
        self.row.update(train_seconds=1.0, train_images_per_s=10.0)


def fake_results(runs, gain):
    rng = random.Random(1)
    return [
        Done(0.5 + rng.gauss(0, 0.005) + gain * (r.variant == "better"), r.seq_len) for r in runs
    ]


def test_each_variant_is_compared_with_the_baseline_at_the_same_input(quick_report):
    params = dict(seed=[0, 1, 2, 3], seq_len=[2, 4], baseline="default")
    runs, _ = quick_report(variants={"default": {}, "better": {"lr": 0.02}}, **params)
    found = report.findings_frame(runs, fake_results(runs, 0.05), "default")
    assert len(found) == 2 and set(found["seeds"]) == {4}
    assert all("better" in c and "default" in a for c, a in zip(found.comparison, found.against))
    assert all(c.endswith(a[-5:]) for c, a in zip(found.comparison, found.against))  # same L
    assert list(found.verdict) == ["better", "better"]
    table = report.seeds_frame(runs, fake_results(runs, 0.05))
    assert len(table) == 4 and set(table.seeds) == {4} and (table.ci_low < table["test acc"]).all()


def test_a_baseline_that_is_neither_a_variant_nor_a_run_fails_before_any_run(quick_report):
    with pytest.raises(schema.ParamError, match=r"baseline = 'defualt': .* variants \['default'"):
        quick_report(variants={"default": {}, "x": {"lr": 0.02}}, baseline="defualt")
    runs, _ = quick_report(seq_len=[2, 4], baseline="digits, bilstm_fc, identity, L = 2")
    assert len(runs) == 2


def test_a_distilled_configuration_is_compared_with_its_undistilled_twin(quick_report):
    runs, _ = quick_report(teacher="fast_cnn", teacher_epochs=1, seed=[0, 1, 2])
    pairs = report.comparisons(runs, fake_results(runs, 0))
    assert len(pairs) == 1
    run, _, base, _ = pairs[0]
    assert run.distill.teacher and not base.distill.teacher


# ---- tune on any transform


def test_tune_accepts_a_rows_model(tmp_path, outputs):
    path = tmp_path / "rows.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "dataset": "digits",
                "model": "lstm",
                "transform": "rows",
                "epochs": 1,
                "threads": 1,
                "overview_per_class": 0,
                "search": {"lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True}},
            }
        )
    )
    spec = tune.read_tune_file(path)
    assert spec.params["transform"] == "rows"
    assert tune.tune(path, n_trials=1, best=tmp_path / "best.yaml") == 0
    best = schema.read_params_file(tmp_path / "best.yaml")
    assert plan.plan_report({**schema.defaults(), **best})[0].transform == "rows"


# ---- the report


@pytest.mark.slow
def test_a_smoke_report_with_two_seeds_shows_findings_and_the_ladder(tmp_path):
    variants = yaml.safe_dump({"base": {}, "fast": {"lr": 0.05}}, default_flow_style=True)
    rows, markdown = smoke_report(
        tmp_path, seed="[0, 1]", seq_len=4, variants=variants.strip(), baseline="base"
    )
    assert sorted((r["variant"], r["seed"]) for r in rows) == [
        ("base", "0"), ("base", "1"), ("fast", "0"), ("fast", "1")
    ]  # fmt: skip
    assert "### Findings" in markdown and "2 training seeds per configuration" in markdown
    html = (tmp_path / "outputs" / "smoke.html").read_text()
    assert "95% CI" in html and "no detectable difference" in html or "better" in html
    assert 'alt="test accuracy of each compared configuration over its seeds' in html


def test_variant_and_distillation_tables_average_over_seeds():
    import pandas as pd

    runs = pd.DataFrame(
        {
            "model": ["m"] * 4,
            "variant": ["a", "b", "a", "b"],
            "test_acc": [0.50, 0.60, 0.52, 0.64],
            "train_seconds": [10.0, 20.0, 12.0, 22.0],
        }
    )
    table = report.over_seeds(runs, ["model", "variant"])
    assert list(table.variant) == ["a", "b"] and list(table.seeds) == [2, 2]
    assert table.test_acc.tolist() == pytest.approx([0.51, 0.62])
    assert table["test_acc sd"].tolist() == pytest.approx([0.02 / 2**0.5, 0.04 / 2**0.5])
    assert table.train_seconds.tolist() == pytest.approx([11.0, 21.0])
