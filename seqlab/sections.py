"""The sections of report.ipynb, each drawn by one call: Results first (the summary table, the
plot, a reading of the numbers), then a section per run, distillation, variants and tuning where
the report has them (a section with nothing to show is left out), the data, and the parameters
as an appendix. Everything is displayed as HTML or Markdown with a plain-text twin; figures carry
alt text and are closed once shown, so each is drawn once."""

from __future__ import annotations

import base64
import html
import io

from seqlab import figures, files, report, schema, stats

NUMBERS = {
    "test acc": "{:.2%}",
    "macro-F1": "{:.3f}",
    "train s": "{:,.0f}",
    "images/s": "{:,.0f}",
    "params": "{:,.0f}",
}


def show(markdown: str = None, *, html_text: str = None, text: str = ""):
    """One output: Markdown or HTML, with `text` (default: the Markdown) for plain viewers."""
    from IPython.display import display

    data = {"text/plain": text or markdown or ""}
    data.update({"text/markdown": markdown} if markdown else {"text/html": html_text})
    display(data, raw=True)


def image(fig, alt: str) -> str:
    """A matplotlib figure as an <img> with alt text; the figure is closed. None (a figure that
    could not be drawn) is said in its place."""
    if fig is None:
        return f"<p><em>(not drawn: {html.escape(alt)})</em></p>"
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    figures.close(fig)
    src = base64.b64encode(buf.getvalue()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{src}">'


def figure(fig, alt: str):
    show(html_text=image(fig, alt), text=f"[figure: {alt}]")


def table_html(frame, formats=None, index=False) -> str:
    """A DataFrame as a compact HTML table (numbers formatted, no index unless asked)."""
    formats = {k: v for k, v in (formats or NUMBERS).items() if k in frame.columns}
    styler = frame.style.format(formats, na_rep="", escape="html")  # a class name is text
    return (styler if index else styler.hide(axis="index")).to_html()


def table(frame, formats=None, index=False):
    show(html_text=table_html(frame, formats, index), text=frame.to_string(index=index))


def side_by_side(*parts: str, text=""):
    """Tables and images in one row (wrapping on a narrow page)."""
    cells = "".join(f"<div>{p}</div>" for p in parts)
    show(
        html_text=f'<div style="display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start">'
        f"{cells}</div>",
        text=text,
    )


def _class_table(rep) -> str:
    return table_html(
        figures.report_table(rep),
        {"precision": "{:.3f}", "recall": "{:.3f}", "f1-score": "{:.3f}", "support": "{:.0f}"},
        index=True,
    )


def show_models(models, per_model):
    """The models of this report, from the registry, with their per-model overrides."""
    from seqlstm import MODEL_INFO

    show(
        "\n".join(
            ["| model | input form | source | per-model overrides |", "|---|---|---|---|"]
            + [
                f"| `{m}` | {MODEL_INFO[m]['input_form']} | {MODEL_INFO[m]['paper']} | "
                f"{(per_model or {}).get(m) or ''} |"
                for m in models
            ]
        )
    )


SEEDS = {**NUMBERS, "sd": "{:.2%}", "macro-F1": "{:.3f}"}
FINDINGS = {"difference (points)": "{:+.2f}", "p": "{:.3g}"}


def show_results(runs, results, models, baseline=""):
    """## Results: with several seeds the findings (each comparison paired by seed, and the ladder
    of its configurations), then the summary table (one row per run, or per configuration over
    its seeds), accuracy against L (or per run), a reading of the numbers."""
    with_model = len(models) > 1
    summary = report.summary_frame(results, with_model)
    show("## Results")
    if summary.empty:
        return show("No run of this report finished.")
    show(report.conditions(results))
    laddered = False
    if report.several_seeds(runs):
        laddered = show_findings(runs, results, baseline, with_model)
        summary = report.seeds_frame(runs, results, with_model)
        shown = summary.drop(columns=["ci_low", "ci_high"])
        shown.insert(
            5, "95% CI", [_interval(lo, hi) for lo, hi in zip(summary.ci_low, summary.ci_high)]
        )
        table(shown, SEEDS)
    else:
        table(summary)
    fig, alt = figures.plot_summary(summary, report.chance_level(results))
    if fig is not None and (summary.groupby("run")["L"].nunique().max() > 1 or not laddered):
        figure(fig, alt)  # bars per run would repeat the ladder
    elif fig is not None:
        figures.close(fig)
    show("\n".join(report.reading(summary, report.compared(results))))


def _interval(low, high) -> str:
    return "" if low != low else f"{low:.2%} to {high:.2%}"  # nan: one seed


def show_findings(runs, results, baseline, with_model):
    """### Findings: each comparison's paired difference, interval, p-value and verdict, and the
    compared configurations as a ladder (seeds as dots, mean with its interval). Whether it
    showed anything."""
    found = report.findings_frame(runs, results, baseline, with_model)
    if found.empty:
        return False
    show(
        "### Findings\n\nEach comparison pairs the runs of the same training seed: the mean "
        "difference in test accuracy, its 95% interval and the paired t-test's p-value; "
        "*better* or *worse* where p < 0.05, else *no detectable difference*."
    )
    table(found, FINDINGS)
    steps = {}
    for run, by_seed, base, base_seeds in report.comparisons(runs, results, baseline):
        for r, seeds in ((base, base_seeds), (run, by_seed)):
            acc = report.accuracies(seeds)
            steps.setdefault(
                r.config,
                (
                    report.config_title(r, with_model),
                    stats.spread(acc.values()),
                    list(acc.values()),
                ),
            )
    figure(
        figures.plot_ladder(list(steps.values())),
        "test accuracy of each compared configuration over its seeds, mean with 95% interval",
    )
    return True


def _run_section(r, name):
    show(f"### {report.md(name)}")
    if r.status == "failed":  # contained: shown here, listed at the end; the other runs went on
        return show(
            f"**This run failed** and was recorded as FAILED (MLflow run "
            f"`{r.row['mlflow_run_id']}`): `{r.error}`"
        )
    show(report.result_line(r))
    side_by_side(
        image(r.sequence_fig, f"{name}: one test image's sequence, step by step"),
        image(figures.plot_history(r.history), f"{name}: loss and accuracy per epoch"),
        text=f"[figures: {name}: the sequence; loss and accuracy per epoch]",
    )
    confusion = figures.plot_confusion(r.confusion, r.classes, "confusion matrix (test)")
    side_by_side(
        _class_table(r.report),
        image(confusion, f"{name}: confusion matrix, test split"),
        text=report.outcome_line(r),
    )


def show_runs(runs, results, models):
    """## Runs: per run what the model sees, learning curves, per-class report, confusion; with
    several seeds, the first seed's run of each configuration (the others are in MLflow)."""
    several = report.several_seeds(runs)
    show(
        "## Runs\n\nOne training per (dataset, model, transform, L): one test image's sequence as "
        "the model reads it, the learning curves, the per-class report on the test split and the "
        "confusion matrix."
        + (" With several seeds, the first seed's run of each configuration." if several else "")
    )
    shown = set()
    for run, r in zip(runs, results):
        if several and run.config in shown:
            continue
        shown.add(run.config)
        _run_section(r, run.title(len(models) > 1, several))


def show_distillation(results):
    """## Distillation, if a run had a teacher: each teacher, then the students against their
    twins."""
    teachers = report.report_teachers(results)
    if not teachers:
        return
    show(
        "## Distillation\n\nEach student was also trained from a CNN teacher (Hinton et al., 2015; "
        "`distill_hard`: DeiT's hard-label variant) beside its undistilled twin, at equal epochs; "
        "agreement is the share of test images whose top-1 prediction matches the teacher's."
    )
    for t in teachers:
        show(report.teacher_title(t))
        confusion = figures.plot_confusion(t["confusion"], t["classes"], "confusion matrix (test)")
        side_by_side(
            _class_table(t["report"]),
            image(confusion, f"teacher {t['name']}: confusion matrix, test split"),
        )
    students = report.distillation_table(results)
    if len(report.seeds_of(results)) > 1:
        students = report.over_seeds(students, ["student", "distillation"])
    table(
        students,
        {
            "test_acc sd": "{:.2%}",
            "test_acc": "{:.2%}",
            "without": "{:.2%}",
            "gain (points)": "{:+.1f}",
            "agreement": "{:.1%}",
            "agreement without": "{:.1%}",
        },
    )


def show_variants(results, variants):
    """## Strategies and components, if the report has variants."""
    if not variants:
        return
    show(
        "## Strategies and components\n\nEvery model under each variant at the same epochs: test "
        "accuracy, final training loss, the gradient norm's range before clipping (the lowest "
        "epoch mean to the largest step) and the training time."
    )
    strategies, seeds = report.variant_table(results), report.seeds_of(results)
    if len(seeds) > 1:  # the means over seeds; the curves of the first seed
        strategies = report.over_seeds(strategies, ["model", "variant"])
        results = [r for r in results if r.params.get("seed") == seeds[0]]
    table(
        strategies,
        {
            "test_acc": "{:.2%}",
            "test_acc sd": "{:.2%}",
            "final_train_loss": "{:.3f}",
            "grad_norm_min": "{:.3g}",
            "grad_norm_max": "{:.3g}",
            "train_seconds": "{:.0f}",
        },
    )
    figure(
        figures.plot_variants(strategies), "test accuracy, loss, gradient norm and time per variant"
    )
    figure(figures.plot_curves(results), "learning curves of the variants, one row per model")


def show_tuning(study, storage):
    """## Tuning, if the report names an Optuna study."""
    if not study:
        return
    figs, best, states = report.tuning_figures(study, storage)
    show(
        f"## Tuning\n\nStudy `{study}`: "
        + ", ".join(f"{n} {s.lower()}" for s, n in states.items())
        + " trials. The best trial is selected on validation accuracy; its test accuracy is shown, "
        "never used to choose."
    )
    for fig in figs:
        figure(fig, f"Optuna study {study}")
    table(best, {}, index=True)


def show_data(datasets, per_class):
    """## Data: each dataset's splits, images per class and sample images."""

    if not per_class:
        return
    show(
        "## Data\n\nImages per class and split (validation is carved from train with split_seed), "
        "and sample training images per class."
    )
    for data in datasets.values():
        counts, fig = figures.dataset_overview(data, per_class=per_class)
        n = data.counts()
        show(
            f"### {data.name}: {len(data.classes)} classes, images "
            f"{' x '.join(map(str, data.image_shape))}, {n['train']:,} train / {n['val']:,} val / "
            f"{n['test']:,} test ({data.source})"
        )
        shown = (
            counts if len(counts) <= 20 else counts.describe().loc[["count", "min", "mean", "max"]]
        )
        side_by_side(
            table_html(shown, {}, index=True),
            image(fig, f"sample training images of {data.name}, per class"),
        )


def show_parameters(params: dict):
    """## Appendix: the parameters that differ from the defaults, all of them one click away."""
    defaults, params = schema.defaults(), files.masked(params)
    changed = {k: v for k, v in params.items() if v != defaults.get(k)}
    rows = "".join(
        f"<tr><td><code>{html.escape(k)}</code></td><td><code>{html.escape(repr(v))}"
        f"</code></td><td>{html.escape(schema.SCHEMA[k].help)}</td></tr>"
        for k, v in params.items()
    )
    show(
        "## Appendix: parameters\n\n"
        + (
            "Set for this report (the others are at their defaults): "
            + ", ".join(f"`{k}` = `{v!r}`" for k, v in changed.items())
            if changed
            else "Every parameter is at its default."
        )
    )
    show(
        html_text=f"<details><summary>All {len(params)} parameters</summary><table>"
        f"<tr><th>parameter</th><th>value</th><th>meaning</th></tr>{rows}</table>"
        f"</details>",
        text=", ".join(f"{k}={v!r}" for k, v in params.items()),
    )
