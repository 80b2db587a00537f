"""What a report shows, for the notebook and the command line alike: every check before the first
run (prepare_report), the tables of results (summary, distillation, variants, tuning), and the
report's last word on failed runs."""

from __future__ import annotations

import json
import re
import warnings

from seqlab import cores, files, fits, plan, stats, studies, tracking

MARKDOWN = re.compile(r"([\\`*_\[\]<>#|$~&])")


def md(text) -> str:
    """`text` (a dataset, class or variant name, a path) as literal Markdown: its `*`, `_`, `<`,
    `$` ... are shown, not read as emphasis, HTML or mathematics."""
    return MARKDOWN.sub(r"\\\1", str(text))


class RunsFailed(RuntimeError):
    """Some runs of a report failed; the report rendered all the others."""


def prepare_report(params: dict, types: dict = None):
    """Everything a report checks before its first run, for the command line and the notebook
    alike: parameters of every planned run, the outputs folder, the tracking store, then each
    dataset loaded once and the transform and model arguments tried on its images.
    Returns (runs, loaded data by data_key). It is where every process of a report starts (the
    notebook's kernel, `train` and its DDP ranks, `tune` workers), so it makes the process a
    training one (cores.training_process: the allocator setting, denormals flushed)."""
    cores.training_process()
    runs = plan.plan_report(params, types)
    check_baseline(runs, runs[0].params["baseline"])
    files.check_outputs()
    tracking.check_tracking()
    studies.check_study(runs[0].params["tune_study"], runs[0].params["tune_storage"])
    fits.check_before_loading(runs)
    loaded = plan.load_report_data(runs)
    plan.fit_channels(runs, loaded)
    plan.check_run_inputs(runs, loaded)
    fits.check_runs(runs, loaded)
    for experiment in dict.fromkeys(r.experiment for r in runs):  # all checked: MLflow opens
        tracking.Tracker(experiment).end_dead_runs()
    return runs, loaded


def report_teachers(results) -> list:
    """The teachers of a report's runs (their info: accuracy, report, confusion), once each."""
    found = {r.teacher["key"]: r.teacher for r in results if r.status != "failed" and r.teacher}
    return list(found.values())


def teacher_title(t: dict) -> str:
    """A teacher's heading in the report: accuracy (with its test-time views: the one-view figure
    beside it), epochs, training time and where it is kept."""
    tta = t["recipe"].get("tta", "none")
    views = (
        f" ({tta} test-time views; one view {t['test_acc_one_view']:.2%})" if tta != "none" else ""
    )
    return (
        f"### Teacher `{t['name']}` on {md(t['dataset'])}: test accuracy "
        f"**{t['test_acc']:.2%}**{views}, {t['epochs']} epochs, "
        f"{t['train_seconds'] / 60:.1f} min of training ({t['train_images_per_s']:,} images/s); "
        f"MLflow run `{t['mlflow_run_id']}`, key `{t['key']}`"
    )


def _class_gains(report, base_report, classes, shown=3):
    """The classes whose test recall rose most, and those that fell, in points."""
    gains = sorted(
        ((100 * (report[c]["recall"] - base_report[c]["recall"]), c) for c in classes), reverse=True
    )
    up = ", ".join(f"{c} {g:+.1f}" for g, c in gains[:shown] if g > 0) or "none"
    down = ", ".join(f"{c} {g:+.1f}" for g, c in gains[::-1][:shown] if g < 0) or "none"
    return up, down


def distillation_table(results):
    """One row per distilled student: its test accuracy and its undistilled twin's (same parameters,
    no teacher: equal epochs), the gain, the share of test images where its top-1 prediction matches
    the teacher's (and the twin's), and the classes whose recall rose and fell most."""
    import numpy as np
    import pandas as pd

    def twin_id(p):
        return json.dumps(plan.run_identity({**p, "teacher": ""}), sort_keys=True, default=str)

    def agreement(preds, teacher):
        return (
            float(np.mean(np.array(preds) == np.array(teacher["preds"])))
            if len(preds)
            else float("nan")
        )

    ok = [r for r in results if r.status != "failed"]
    twins = {twin_id(r.params): r for r in ok if not r.params.get("teacher")}
    rows = []
    for r in (r for r in ok if r.params.get("teacher")):
        base = twins.get(twin_id(r.params))
        up, down = _class_gains(r.report, base.report, r.classes) if base else ("", "")
        rows.append(
            {
                "student": plan.Run({**r.params, "teacher": "", "variant": ""}).title(),
                "distillation": plan.Run(r.params).distill.title(),
                "epochs": r.params["epochs"],
                "test_acc": r.row["test_acc"],
                "without": base.row["test_acc"] if base else float("nan"),
                "gain (points)": 100 * (r.row["test_acc"] - base.row["test_acc"])
                if base
                else float("nan"),
                "agreement": agreement(r.preds, r.teacher),
                "agreement without": agreement(base.preds, r.teacher) if base else float("nan"),
                "classes up": up,
                "classes down": down,
            }
        )
    return pd.DataFrame(rows)


def end_report(results):
    """The report's last word: the failed runs, listed; raising makes papermill (and the command
    line) exit non-zero once everything else has rendered."""
    failed = [r for r in results if r.status == "failed"]
    reused = sum(r.status == "reused" for r in results)
    trained = len(results) - len(failed) - reused
    print(f"{trained} run(s) trained, {reused} reused, {len(failed)} failed")
    if failed:
        raise RunsFailed(
            "failed runs:\n"
            + "\n".join(
                f"- {r.params['dataset']}, {r.params['model']}, {r.params['transform']}, "
                f"L = {r.params['seq_len']}: {r.error}"
                for r in failed
            )
        )


def variant_table(results):
    """One row per finished run of a report with variants: test accuracy, final training loss, the
    range of the per-epoch gradient norms (before clipping: the lowest epoch mean to the highest
    step), training time."""
    import pandas as pd

    rows = []
    for r in results:
        if r.status == "failed" or not r.history:
            continue
        h = r.history
        rows.append(
            {
                "model": r.row["model"],
                "variant": r.row.get("variant", ""),
                "test_acc": float(r.row["test_acc"]),
                "final_train_loss": h[-1].get("train_loss"),
                "grad_norm_min": min(e.get("grad_norm_mean", 0) for e in h),
                "grad_norm_max": max(e.get("grad_norm_max", 0) for e in h),
                "train_seconds": float(r.row["train_seconds"]),
            }
        )
    return pd.DataFrame(rows)


def tuning_figures(study_name, storage=""):
    """The Tuning section of a report: Optuna's optimisation history, parameter importances and
    parallel coordinates (matplotlib), and the best trial as a table."""
    import optuna
    import pandas as pd
    from optuna.visualization import matplotlib as plots

    storage = studies.open_storage(studies.storage_url(storage))
    study = optuna.load_study(study_name=study_name, storage=storage)
    figs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's ExperimentalWarning for its matplotlib plots
        for plot in (
            plots.plot_optimization_history,
            plots.plot_param_importances,
            plots.plot_parallel_coordinate,
        ):
            try:
                axes = plot(study)
                figs.append((axes.flat[0] if hasattr(axes, "flat") else axes).figure)
            except (
                ValueError,
                RuntimeError,
                ZeroDivisionError,
            ) as e:  # too few finished trials for it
                print(f"{plot.__name__}: {e}")
    best = study.best_trial
    table = pd.DataFrame(
        {
            "best trial": {
                "trial": best.number,
                "validation accuracy": round(best.value, 4),
                "test accuracy": best.user_attrs.get("test_acc"),
                **best.params,
                "MLflow run": best.user_attrs.get("mlflow_run_id"),
            }
        }
    )
    states = pd.Series([t.state.name for t in study.trials]).value_counts().to_dict()
    return figs, table, states


# ---- the runs, one after another, and what the Results section says of them


def outcome_line(r) -> str:
    """A run's result as one line of text: accuracy, macro-F1, time (or why it failed)."""
    if r.status == "failed":
        return f"   FAILED: {r.error}"
    m = r.row
    how = "reused, " if r.status == "reused" else ""
    return (
        f"   {how}test accuracy {float(m['test_acc']):.2%}, macro-F1 {float(m['macro_f1']):.3f}, "
        f"{float(m['train_seconds']):,.0f} s of training"
    )


def several_seeds(runs) -> bool:
    return len({run.train.seed for run in runs}) > 1


def train_all(runs, datasets, with_model=True) -> list:
    """Every run of the report, in turn, each headed and ended by a line of text."""
    from seqlab import runner

    results, with_seed = [], several_seeds(runs)
    for i, run in enumerate(runs, 1):
        print(f"\n== run {i}/{len(runs)}: {run.title(with_model, with_seed)}", flush=True)
        results.append(runner.run_experiment(run, datasets[run.data.key]))
        print(outcome_line(results[-1]), flush=True)
    return results


def summary_frame(results, with_model=True):
    """The finished runs, one row each, as compact as the page needs."""
    import pandas as pd

    rows = [
        {
            "run": plan.Run(
                {**r.params, "seq_len": None, "variant": r.row.get("variant", "")}
            ).title(with_model),
            "L": int(r.row["seq_len"]),
            "test acc": float(r.row["test_acc"]),
            "macro-F1": float(r.row["macro_f1"]),
            "epochs": int(r.row["epochs"]),
            "train s": float(r.row["train_seconds"]),
            "images/s": float(r.row["train_images_per_s"]),
            "params": int(r.row["n_params"]),
            "status": r.status,
            "MLflow run": str(r.row["mlflow_run_id"])[:8],
        }
        for r in results
        if r.status != "failed"
    ]
    return pd.DataFrame(rows)


def chance_level(results) -> float:
    classes = [len(r.classes) for r in results if r.status != "failed" and r.classes]
    return 1 / max(classes) if classes else 0.0


def conditions(results) -> str:
    """Where and how the runs trained, in one sentence."""
    done = [r for r in results if r.status != "failed"]

    def values(key):
        return md(", ".join(sorted({str(r.params.get(key, "?")) for r in done}, key=_natural)))

    seeds = {r.params.get("seed") for r in done}
    repeats = (
        f"{len(seeds)} training seeds per configuration ({values('seed')}; split seed "
        f"{values('split_seed')}): tables give the mean ± standard deviation and the 95% "
        f"interval of the mean (Student's t), comparisons pair the runs of each seed."
        if len(seeds) > 1
        else f"seed {values('seed')}, one run per configuration, so differences of about a "
        f"point are within seed noise."
    )
    return (
        f"Trained on {values('device')} with {values('threads')} thread(s), "
        f"{values('epochs')} epochs; data: {values('data_source')}. Test metrics are those of "
        f"the best-validation checkpoint; {repeats}"
    )


def _natural(text):
    return (0, int(text)) if text.isdigit() else (1, text)


def _group_line(name, g):
    best, worst = g.loc[g["test acc"].idxmax()], g.loc[g["test acc"].idxmin()]
    spread = 100 * (best["test acc"] - worst["test acc"])
    of = (
        f" (mean of {int(g['seeds'].min())} seeds)" if "seeds" in g and g["seeds"].min() > 1 else ""
    )
    line = f"- **{md(name)}**: best test accuracy{of} {best['test acc']:.2%} at L = {best['L']}"
    if len(g) > 1:
        line += (
            f", worst {worst['test acc']:.2%} at L = {worst['L']} (a spread of {spread:.1f} "
            f"points{': within the noise of one seed' if spread < 1 else ''})"
        )
    rates = sorted({int(g["images/s"].min()), int(g["images/s"].max())})
    line += f". Training ran at {'–'.join(f'{v:,}' for v in rates)} images/s"
    if "identity" in name.split(", ") and len(g) > 1:
        line += ", nearly independent of L: the input projection is computed once per image"
    return line + "."


def compared(results) -> str:
    """What the report's runs differ in: "models", "transforms", "models and transforms"."""
    done = [r for r in results if r.status != "failed"]
    kinds = [k for k in ("model", "transform") if len({r.row[k] for r in done}) > 1]
    return " and ".join(f"{k}s" for k in kinds) or "runs"


def reading(summary, what="runs") -> list:
    """A short reading of the summary, written from its numbers: Markdown bullets."""
    lines = [_group_line(name, g) for name, g in summary.groupby("run", sort=False)]
    if summary["run"].nunique() > 1:
        ranked = summary.sort_values("test acc", ascending=False)
        top, low = ranked.iloc[0], ranked.iloc[-1]
        lines.append(
            f"- Across {what}, **{md(top['run'])}** (L = {top['L']}) reached the best test "
            f"accuracy, {top['test acc']:.2%}, and **{md(low['run'])}** the lowest, "
            f"{low['test acc']:.2%}"
            + (
                f", at the same epochs ({top['epochs']})."
                if summary["epochs"].nunique() == 1
                else f", after {top['epochs']} and {low['epochs']} epochs."
            )
        )
    return lines


def result_line(r) -> str:
    """A run's result in the report: accuracy, macro-F1, size, epochs, time, data, MLflow run."""
    m, p = r.row, r.params
    reused = (
        " — **reused**: this run had finished with the same parameters, data and code"
        if r.status == "reused"
        else ""
    )
    return (
        f"**Test accuracy {float(m['test_acc']):.2%}**, macro-F1 {float(m['macro_f1']):.3f}, "
        f"{int(m['n_params']):,} parameters, {m['epochs']} epochs, "
        f"{float(m['train_seconds']):.0f} s of training ({int(float(m['train_images_per_s'])):,} "
        f"training images/s on {p.get('device')}, {p.get('threads')} threads); data: "
        f"{md(p.get('data_source'))}; MLflow run `{m['mlflow_run_id']}`{reused}"
    )


# ---- repeated runs: one configuration over several training seeds, and comparisons by seed


def repeats(runs, results) -> dict:
    """The finished runs by configuration (plan.Run.config) in planned order:
    {config: (its first run, {seed: result})}."""
    groups = {}
    for run, r in zip(runs, results):
        if r.status != "failed":
            groups.setdefault(run.config, (run, {}))[1][run.train.seed] = r
    return groups


def accuracies(by_seed: dict) -> dict:
    return {seed: float(r.row["test_acc"]) for seed, r in by_seed.items()}


def _label(run, with_model=True) -> str:
    return plan.Run({**run.params, "seq_len": None}).title(with_model)


def config_title(run, with_model=True) -> str:
    """A configuration as the findings name it (and `baseline` may): its title, L last."""
    return _label(run, with_model) + (f", L = {run.seq_len}" if run.seq_len else "")


def seeds_frame(runs, results, with_model=True):
    """One row per configuration: its seeds, test accuracy as mean, sd and 95% interval (ci_low,
    ci_high; nan for one seed), mean macro-F1, epochs and mean training time."""
    import pandas as pd

    rows = []
    for run, by_seed in repeats(runs, results).values():
        acc = stats.spread(accuracies(by_seed).values())
        mean = lambda key: sum(float(r.row[key]) for r in by_seed.values()) / len(by_seed)  # noqa: E731
        rows.append(
            {
                "run": _label(run, with_model),
                "L": int(next(iter(by_seed.values())).row["seq_len"]),
                "seeds": acc.n,
                "test acc": acc.mean,
                "sd": acc.sd,
                "ci_low": acc.low,
                "ci_high": acc.high,
                "macro-F1": mean("macro_f1"),
                "epochs": int(run.train.epochs),
                "train s": mean("train_seconds"),
                "images/s": mean("train_images_per_s"),
            }
        )
    return pd.DataFrame(rows)


def _same_input(a, b) -> bool:
    return all(a.params[k] == b.params[k] for k in ("dataset", "model", "transform", "seq_len"))


def _twin(run, groups):
    """The undistilled twin of a distilled run's configuration, if it ran."""
    ident = plan.run_identity({**run.params, "teacher": "", "seed": None})
    for other, by_seed in groups:
        if plan.run_identity({**other.params, "seed": None}) == ident:
            return other, by_seed
    return None


def comparisons(runs, results, baseline="") -> list:
    """(configuration, its seeds' results, baseline configuration, its seeds' results) for every
    configuration compared: with `baseline` a variant, each other variant against it at the same
    input (dataset, model, transform, L); with `baseline` a run's title, every configuration of
    its dataset against it; and each distilled configuration against its undistilled twin."""
    groups = list(repeats(runs, results).values())
    found = []
    for run, by_seed in groups:
        for base, base_seeds in groups:
            if base is not run and _is_baseline(base, run, baseline):
                found.append((run, by_seed, base, base_seeds))
        twin = _twin(run, groups) if run.distill.teacher else None
        if twin and not any(f[0] is run and f[2] is twin[0] for f in found):
            found.append((run, by_seed, *twin))
    return found


def _is_baseline(base, run, baseline) -> bool:
    if not baseline or base.dataset != run.dataset:
        return False
    if base.variant == baseline:
        return run.variant != baseline and _same_input(base, run)
    return config_title(base) == baseline


def findings_frame(runs, results, baseline="", with_model=True):
    """One row per comparison: the difference in test accuracy paired by seed (points), its 95%
    interval, the paired t-test's p-value and the verdict."""
    import pandas as pd

    rows = []
    for run, by_seed, base, base_seeds in comparisons(runs, results, baseline):
        d = stats.paired(accuracies(by_seed), accuracies(base_seeds))
        rows.append(
            {
                "comparison": config_title(run, with_model),
                "against": config_title(base, with_model),
                "seeds": d.n,
                "difference (points)": 100 * d.diff,
                "95% CI (points)": f"{100 * d.low:+.1f} to {100 * d.high:+.1f}" if d.n > 1 else "",
                "p": d.p,
                "verdict": d.verdict,
            }
        )
    return pd.DataFrame(rows)


def seeds_of(results) -> list:
    return sorted({r.params.get("seed") for r in results if r.status != "failed"}, key=str)


def over_seeds(frame, keys, value="test_acc"):
    """A table of runs averaged over their seeds: one row per `keys`, each numeric column's mean,
    the number of seeds and the standard deviation of `value` beside it."""
    groups = frame.groupby(keys, sort=False)
    out = groups.mean(numeric_only=True)
    out.insert(0, "seeds", groups.size())
    out.insert(out.columns.get_loc(value) + 1, f"{value} sd", groups[value].std())
    return out.reset_index()


def check_baseline(runs, baseline):
    """`baseline` names a variant of the report or a run's title (as the summary shows it)."""
    if not baseline:
        return
    names = list(dict.fromkeys([r.variant for r in runs if r.variant]))
    titles = list(dict.fromkeys(config_title(r) for r in runs))
    if baseline not in names + titles:
        raise plan.schema.ParamError(
            f"parameter baseline = {baseline!r}: not a variant or run of this report; valid "
            f"values are the variants {names} or the runs {titles}"
        )
