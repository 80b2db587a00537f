"""Figures and tables of runs: a confusion matrix, one image's sequence as the model reads it,
learning curves, a classification report as a table, and the comparisons of variants."""

from __future__ import annotations

import math

import torch

from seqlstm import STEP_LAYOUT, ImageData


def plain(text) -> str:
    """`text` drawn as written: a `$` (a class, dataset or variant name's) starts no mathtext, so
    `$\\frac{$` is drawn, not parsed (and failed on)."""
    return str(text).replace("$", r"\$")


def drawn(what: str, draw, *args):
    """`draw(*args)`, or None with a warning if it fails: a figure that cannot be drawn costs
    that figure, never the run's training or results."""
    try:
        return draw(*args)
    except Exception as e:  # noqa: BLE001 (any drawing error: the figure is left out)
        print(f"warning: {what} could not be drawn ({type(e).__name__}: {e})", flush=True)
        return None


def close(*figs):
    """Figures drawn for a file or a later display, closed now: a notebook's inline backend would
    otherwise show every open figure again at the end of the cell."""
    import matplotlib.pyplot as plt

    for fig in figs:
        if fig is not None:
            plt.close(fig)


def plot_confusion(cm, classes, title=""):
    import matplotlib.pyplot as plt
    import seaborn as sns

    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * k, 0.9 + 0.5 * k))
    sns.heatmap(
        cm,
        annot=k <= 20,
        fmt="d",
        cmap="Blues",
        xticklabels=[plain(c) for c in classes],
        yticklabels=[plain(c) for c in classes],
        ax=ax,
        cbar=False,
    )
    ax.set(xlabel="predicted", ylabel="true", title=plain(title))
    fig.tight_layout()
    return fig


def report_table(report: dict):
    """sklearn's classification_report(output_dict=True) as a DataFrame, its accuracy entry as a row
    with the test-set size as support (sklearn gives a bare number there)."""
    import pandas as pd

    table = pd.DataFrame({k: v for k, v in report.items() if k != "accuracy"}).T
    accuracy = pd.DataFrame(
        {"f1-score": report["accuracy"], "support": table.loc["macro avg", "support"]},
        index=["accuracy"],
    )
    return pd.concat([table.iloc[:-2], accuracy, table.iloc[-2:]])


def plot_sequence(seq, image_shape, mean, std, transform, max_steps=10):
    """One image's sequence (T, F) drawn as the model reads it: a panel per step for views,
    crops and patches; for rows, columns and pixels the whole sequence as one picture, laid
    out row after row in reading order."""
    import matplotlib.pyplot as plt

    C, H, W = image_shape
    layout = STEP_LAYOUT.get(transform, "image")
    seq = seq.detach().cpu().float()
    T, n_feat = seq.shape
    if layout == "sequence":  # pixel-major steps: concatenate, then wrap every W pixels
        pixels = seq.reshape(-1, C)  # (T*F/C, C)
        steps = [pixels[: (len(pixels) // W) * W].reshape(-1, W, C)]
    elif layout == "patch":
        p = math.isqrt(n_feat // C)
        steps = [s.reshape(p, p, C) for s in seq[:max_steps]]
    else:  # channel-first views: C x s x s
        s = math.isqrt(n_feat // C)
        steps = [v.reshape(C, s, s).permute(1, 2, 0) for v in seq[:max_steps]]
    steps = [(v * std + mean).clamp(0, 1).numpy() for v in steps]  # back to pixel values
    fig, axes = plt.subplots(
        1, len(steps), figsize=(max(3.2, min(1.3 * len(steps), 13)), 1.9), squeeze=False
    )
    for t, (ax, img) in enumerate(zip(axes[0], steps)):
        ax.imshow(
            img.squeeze(-1) if C == 1 else img, cmap="gray" if C == 1 else None, vmin=0, vmax=1
        )
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(
            "all steps, in reading order" if layout == "sequence" else f"step {t}", fontsize=8
        )
    shown = "" if layout == "sequence" or T <= max_steps else f" (first {max_steps} of {T} steps)"
    fig.suptitle(plain(f"{transform}: T={T}, F={n_feat}{shown}"), fontsize=9)
    fig.tight_layout()
    return fig


def plot_history(history, title=""):
    """Learning curves: training and validation loss, then accuracy, per epoch."""
    import matplotlib.pyplot as plt
    import pandas as pd
    from matplotlib.ticker import MaxNLocator

    h = pd.DataFrame(history).set_index("epoch")
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 2.8))
    h[[c for c in ("train_loss", "val_loss") if c in h]].plot(
        ax=a, marker=".", title=plain(f"{title} loss".strip())
    )
    h[[c for c in ("train_acc", "val_acc") if c in h]].plot(
        ax=b, marker=".", title=plain(f"{title} accuracy".strip())
    )
    for ax in (a, b):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def plot_variants(table):
    """Bars per (model, variant): test accuracy, final training loss, gradient-norm range (log
    scale), time."""
    import matplotlib.pyplot as plt

    labels = [plain(f"{m}: {v}") for m, v in zip(table["model"], table["variant"])]
    fig, axes = plt.subplots(1, 4, figsize=(14, 0.32 * len(table) + 1.4), sharey=True)
    sd = 100 * table["test_acc sd"] if "test_acc sd" in table else None  # over seeds
    axes[0].barh(labels, 100 * table["test_acc"], xerr=sd, capsize=2)
    axes[0].set(xlabel="test accuracy %" + (" (mean ± sd over seeds)" if sd is not None else ""))
    axes[1].barh(labels, table["final_train_loss"]), axes[1].set(xlabel="final training loss")
    axes[2].barh(
        labels, table["grad_norm_max"] - table["grad_norm_min"], left=table["grad_norm_min"]
    )
    axes[2].set(xlabel="gradient norm, min epoch mean .. max step", xscale="log")
    axes[3].barh(labels, table["train_seconds"]), axes[3].set(xlabel="training seconds")
    axes[0].invert_yaxis()
    fig.tight_layout()
    return fig


def plot_curves(results):
    """Learning curves of every variant overlaid, one row of panels per model: validation accuracy,
    training loss and the gradient norm (epoch mean) against the epoch."""
    import matplotlib.pyplot as plt
    import pandas as pd

    done = [r for r in results if r.status != "failed" and r.history]
    models = list(dict.fromkeys(r.row["model"] for r in done))
    fig, axes = plt.subplots(len(models), 3, figsize=(13, 3 * len(models)), squeeze=False)
    for row, m in zip(axes, models):
        for r in (r for r in done if r.row["model"] == m):
            h = pd.DataFrame(r.history).set_index("epoch")
            for ax, col in zip(row, ("val_acc", "train_loss", "grad_norm_mean")):
                if col in h:
                    ax.plot(h.index, h[col], label=plain(r.row.get("variant") or m))
        for ax, col in zip(
            row, ("validation accuracy", "training loss", "gradient norm (epoch mean)")
        ):
            ax.set(title=plain(f"{m}: {col}"), xlabel="epoch")
        row[2].set_yscale("log")
        row[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _accuracy_axis(ax, values, chance, axis="y"):
    """Accuracy in %, lines from chance level (bars from 0) up: a one-point spread stays small."""
    low = 100 * chance if axis == "y" and chance and min(values) > chance else 0
    (ax.set_ylim if axis == "y" else ax.set_xlim)(low, min(100, 100 * max(values) + 10))
    if chance:
        (ax.axhline if axis == "y" else ax.axvline)(100 * chance, ls="--", lw=0.8, color="grey")


def _ci_bars(frame):
    """The 95% intervals of a summary with several seeds (ci_low, ci_high) as error bars in
    points; None without them."""
    if "ci_low" not in frame or frame["ci_low"].isna().all():
        return None
    mean = frame["test acc"]
    return [100 * (mean - frame["ci_low"]).fillna(0), 100 * (frame["ci_high"] - mean).fillna(0)]


def plot_summary(summary, chance=0.0):
    """(figure, alt text) of a report's results: test accuracy against L for the runs whose L
    varied, else per run as bars; (None, None) for a single run. A dashed line marks chance;
    with several seeds, the points are means and the bars their 95% intervals."""
    import matplotlib.pyplot as plt

    groups = summary.groupby("run", sort=False)
    if groups["L"].nunique().max() > 1:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for name, g in groups:
            ax.errorbar(
                g["L"],
                100 * g["test acc"],
                yerr=_ci_bars(g),
                marker="o",
                capsize=3,
                label=plain(name),
            )
            for L, acc in zip(g["L"], g["test acc"]):
                ax.annotate(
                    f"{acc:.1%}",
                    (L, 100 * acc),
                    textcoords="offset points",
                    xytext=(0, 6),
                    ha="center",
                    fontsize=7,
                )
        _accuracy_axis(ax, summary["test acc"], chance)
        ax.set(
            xlabel="sequence length L",
            ylabel="test accuracy %",
            xticks=sorted(summary["L"].unique()),
        )
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        return fig, "test accuracy against the sequence length L; the dashed line is chance"
    if len(summary) < 2:
        return None, None
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(summary) + 1.2))
    labels = [plain(f"{r}, L = {L}") for r, L in zip(summary["run"], summary["L"])]
    ax.barh(labels, 100 * summary["test acc"], xerr=_ci_bars(summary), capsize=3)
    for y, acc in enumerate(summary["test acc"]):
        ax.text(100 * acc, y, f" {acc:.1%}", va="center", fontsize=7)
    _accuracy_axis(ax, summary["test acc"], chance, axis="x")
    ax.set(xlabel="test accuracy %")
    ax.invert_yaxis()
    fig.tight_layout()
    return fig, "test accuracy per run; the dashed line is chance"


def plot_ladder(steps):
    """Each configuration's test accuracy over its seeds, one row per step in planned order: the
    seeds as dots, their mean as a diamond with its 95% interval; the first step's mean as a
    dotted line. `steps`: [(label, stats.Spread, [accuracy per seed])]."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(steps) + 1.3))
    for y, (label, s, values) in enumerate(steps):
        err = None if s.n < 2 else [[100 * (s.mean - s.low)], [100 * (s.high - s.mean)]]
        ax.errorbar(100 * s.mean, y, xerr=err, fmt="D", ms=5, capsize=3, color="#3182bd")
        ax.plot([100 * v for v in values], [y] * len(values), "k.", ms=4, alpha=0.6)
        ax.annotate(
            f"{s.mean:.1%}",
            (100 * s.mean, y),
            xytext=(0, 7),
            textcoords="offset points",
            ha="center",
            fontsize=7,
        )
    ax.axvline(100 * steps[0][1].mean, ls=":", lw=0.9, color="grey")
    ax.set_yticks(range(len(steps)), [plain(label) for label, _, _ in steps], fontsize=8)
    ax.set_ylim(len(steps) - 0.5, -0.7)  # the first step on top
    ax.set(xlabel="test accuracy % (dots: seeds; diamonds: mean with its 95% interval)")
    ax.grid(axis="x", lw=0.3)
    fig.tight_layout()
    return fig


def dataset_overview(data: ImageData, per_class=8, max_classes=20):
    """(counts, figure) for a report: a DataFrame of images per class (index: class names) and split
    (columns train, val, test), and a grid of the first `per_class` train images of each class, one
    row per class labelled with its name; at most `max_classes` rows, evenly spread over the labels,
    with a note in the title when classes are left out."""
    import matplotlib.pyplot as plt
    import pandas as pd

    k = len(data.classes)
    counts = pd.DataFrame(
        {
            split: torch.bincount(getattr(data, f"{split}_y"), minlength=k).tolist()
            for split in ("train", "val", "test")
        },
        index=pd.Index(data.classes, name="class"),
    )
    shown = sorted(set(torch.linspace(0, k - 1, min(k, max_classes)).round().long().tolist()))
    fig, axes = plt.subplots(
        len(shown),
        per_class,
        figsize=(1.6 + 0.8 * per_class, 0.6 + 0.8 * len(shown)),
        squeeze=False,
    )
    gray = data.train_x.shape[1] == 1
    for row, label in zip(axes, shown):
        idx = (data.train_y == label).nonzero().flatten()[:per_class].tolist()
        for j, ax in enumerate(row):
            ax.set_xticks([]), ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if j < len(idx):
                img = data.train_x[idx[j]]
                ax.imshow(
                    img[0].numpy() if gray else img.permute(1, 2, 0).numpy(),
                    cmap="gray" if gray else None,
                    vmin=0,
                    vmax=255,
                    interpolation="nearest",
                )
        name = plain(data.classes[label])
        row[0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    note = f" ({len(shown)} of {k} classes shown)" if len(shown) < k else ""
    title = f"{data.name}: train images, {per_class} per class{note}"
    fig.suptitle(plain(title), fontsize=10)
    fig.tight_layout()
    return counts, fig
