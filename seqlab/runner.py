"""One run of a report: reuse | resume | new (its teacher first) -> build -> fit -> evaluate ->
track. A failure inside a run is contained (recorded FAILED, the report goes on); an interrupt
marks it KILLED. Under DDP every rank fits its share, rank 0 alone tracks."""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field

import pytorch_lightning as pl
import torch

from seqlstm import Batches, ImageData, count_params, normalize
from seqlab import cores, figures, files, lightning, plan, summary, teacher, tracking


@dataclass
class RunResult:
    row: dict  # the summary.csv row
    history: list  # per-epoch train/val metrics
    report: dict  # sklearn classification_report(output_dict=True)
    confusion: object  # numpy (K, K)
    classes: list
    params: dict = field(default_factory=dict)  # the parameters and facts logged with the run
    sequence_fig: object = None  # one test image's sequence, step by step (closed: display it)
    status: str = "ok"  # ok, reused or failed
    error: str = ""
    preds: list = field(default_factory=list)  # top-1 predictions on the test split
    teacher: dict = field(default_factory=dict)  # the teacher's info, if distilled


@dataclass
class Fitted:
    """What fit_run leaves for evaluation and tracking."""

    trainer: object
    timer: lightning.TrainTimer
    module: lightning.SeqClassifier
    example: torch.Tensor  # one test image's sequence (T, F)
    facts: dict  # the parameters and what they do not say (sizes, data source, versions)
    teacher: object = None  # the Teacher, if distilled
    eval_batch: int = 1024


def eval_batch_size(steps: int) -> int:
    """Evaluation batch: 1024 images, fewer for long sequences so that activations of 1,024-step
    models (attention maps above all) stay in cache; measured 2x faster for PiT at 128 than 1024."""
    return max(16, min(1024, 2**17 // steps))


def example_sequence(run: plan.Run, data: ImageData):
    """(transform, one test image's sequence (T, F)): what the model sees."""
    to_seq = run.sequence.make()
    return to_seq, to_seq(normalize(data.test_x[:1], data.mean, data.std))[0]


def sequence_figure(example, run: plan.Run, data: ImageData):
    """One test image's sequence as the model reads it, or None (a warning) if it cannot be
    drawn: a figure never costs a run."""
    shape, mean, std = data.image_shape, data.mean, data.std
    return figures.drawn(
        "the sequence figure", figures.plot_sequence, example, shape, mean, std, run.transform
    )


def build_run(run: plan.Run, data: ImageData, teacher=None):
    """(one test image's sequence, Lightning module), distilling from `teacher` if given."""
    to_seq, example = example_sequence(run, data)
    model = run.network.build(example.shape[1], len(data.classes))
    model = lightning.compiled(model, run.compute.compile)
    t, d = run.train, run.distill
    module = lightning.SeqClassifier(
        model,
        to_seq=to_seq,
        mean=data.mean,
        std=data.std,
        augment=t.augment,
        lr=t.lr,
        weight_decay=t.weight_decay,
        optimizer=t.optimizer,
        schedule=t.schedule,
        warmup_epochs=t.warmup_epochs,
        label_smoothing=t.label_smoothing,
        seed=t.seed,
        teacher=teacher,
        distill_alpha=d.distill_alpha,
        distill_T=d.distill_T,
        distill_hard=d.distill_hard,
    )
    return example, module


def run_facts(data, module, example, threads):
    """What a run's parameters do not say: sizes, data source, versions, device."""
    return {
        "threads": threads,
        "flush_denormal": cores.DENORMALS.get("flush", False),  # cores.training_process
        "n_params": count_params(module.model),
        "seq_steps": example.shape[0],
        "seq_features": example.shape[1],
        "image_shape": list(data.image_shape),
        "data_source": data.source,
        **{f"n_{k}": v for k, v in data.counts().items()},
        "torch": str(torch.__version__),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "code": tracking.code_version(),
    }


def process_rank(compute: plan.ComputeSpec):
    """This process's global rank under DDP, from the launcher's environment (0 before a launch)."""
    if "RANK" in os.environ:  # torchrun, SLURM through Lightning
        return int(os.environ["RANK"])
    return int(os.environ.get("NODE_RANK", 0)) * compute.devices + int(
        os.environ.get("LOCAL_RANK", 0)
    )


def summary_row(run: plan.Run, status, run_id="", **values):
    teacher = run.distill.title().removeprefix("distilled from ") if run.distill.teacher else ""
    return {
        "report": run.experiment,
        "status": status,
        "dataset": run.dataset,
        "model": run.model,
        "variant": run.variant,
        "transform": run.transform,
        "seq_len": values.pop("seq_len", run.seq_len),
        "seed": run.train.seed,
        "epochs": run.train.epochs,
        "teacher": teacher,
        "mlflow_run_id": run_id,
        **values,
    }


def fit_run(run: plan.Run, data: ImageData, tracker, run_id, resume_from=None, callbacks=()):
    """Build (with the run's teacher, trained first if need be) and fit one run (from
    `resume_from` if given): a Fitted. Every DDP rank runs this; rank 0 alone has a tracker."""
    cores.training_process()  # a caller that skipped prepare_report trains with it all the same
    threads = cores.set_threads(run.compute.threads)
    if tracker:
        cores.note_shared_cores(threads)
    taught = teacher.teacher_for(run, data) if run.distill.teacher else None
    if taught is not None and tracker:
        tracker.tag(run_id, {"seqlstm.teacher_key": taught.info["key"]})
    pl.seed_everything(run.train.seed, workers=True, verbose=False)  # after the teacher: the twin's
    example, module = build_run(run, data, taught)
    facts = {**run.params, **run_facts(data, module, example, threads)}
    if tracker and resume_from is None:
        tracker.log_params(run_id, facts)
    eval_batch = run.train.eval_batch_size or eval_batch_size(example.shape[0])
    steps = -(-len(data.train_y) // run.compute.world_size // run.train.batch_size)
    resumed = resume_from is not None
    marks = tracker.epoch_marks(run_id, resumed) if tracker else []  # printed is recorded
    trainer, timer = lightning.make_trainer(
        run.train,
        run.compute,
        checkpoints=files.checkpoint_dir(run_id or "rank0"),
        steps_per_epoch=steps,
        logger=tracker.lightning_logger(run_id, with_metrics=False) if tracker else False,
        callbacks=[*marks, *callbacks],
    )
    rank, world = trainer.global_rank, trainer.world_size  # each rank reads its share (Batches)
    train = Batches(
        data.train_x,
        data.train_y,
        run.train.batch_size,
        shuffle=True,
        seed=run.train.seed,
        rank=rank,
        world=world,
        with_index=taught is not None and taught.table is not None,
    )
    val = Batches(data.val_x, data.val_y, eval_batch, rank=rank, world=world)
    trainer.fit(module, train, val, ckpt_path=resume_from, weights_only=True)
    return Fitted(
        trainer, timer, module, example, {**facts, "world_size": world}, taught, eval_batch
    )


def train_run(
    run: plan.Run, data: ImageData, tracker, run_id, resume_from=None, callbacks=()
) -> RunResult:
    """Fit (fit_run), evaluate and track one run."""
    fit = fit_run(run, data, tracker, run_id, resume_from, callbacks)
    metrics, report, cm, preds = lightning.evaluate(fit.trainer, fit.module, data, fit.eval_batch)
    timer = fit.timer
    row = summary_row(
        run,
        "ok",
        run_id,
        seq_len=fit.example.shape[0],
        n_params=fit.facts["n_params"],
        test_acc=round(metrics["test_acc"], 4),
        macro_f1=round(metrics["macro_f1"], 4),
        train_seconds=round(timer.wall, 1),
        train_images_per_s=round(
            timer.images
            * fit.facts["world_size"]  # all ranks
            / max(timer.seconds, 1e-9)
        ),
    )
    fig = sequence_figure(fit.example, run, data)
    result = RunResult(
        row=row,
        history=fit.module.history,
        report=report,
        confusion=cm,
        classes=data.classes,
        params=fit.facts,
        sequence_fig=fig,
        preds=preds.tolist(),
        teacher=fit.teacher.info if fit.teacher else {},
    )
    track_run(tracker, run_id, run, result, metrics)
    return result


def track_run(tracker, run_id, run: plan.Run, result: RunResult, metrics: dict):
    """Test metrics, artifacts (classification report, confusion matrix, the sequence, params,
    result.json for reuse), the summary row, and the run finished with status ok."""
    m = result.row
    tracker.log_metrics(
        run_id,
        {
            **metrics,
            "train_seconds": m["train_seconds"],
            "train_images_per_s": m["train_images_per_s"],
        },
    )
    title = f"{run.dataset}-{run.model}-{run.transform}-T{m['seq_len']}"
    confusion = figures.drawn(
        "the confusion matrix", figures.plot_confusion, result.confusion, result.classes, title
    )
    saved = {
        "row": m,
        "history": result.history,
        "report": result.report,
        "confusion": result.confusion.tolist(),
        "classes": result.classes,
        "params": result.params,
        "preds": result.preds,
        "teacher": result.teacher,
    }
    tracker.log_result(
        run_id,
        saved,
        result.params,
        {"confusion_matrix.png": confusion, "sequence.png": result.sequence_fig},
    )
    figures.close(confusion, result.sequence_fig)
    summary.append_summary(m)


def reuse_run(tracker, run_id, run: plan.Run, data: ImageData) -> RunResult:
    """A finished run with the same parameters, data and code, read back from the tracker."""
    import numpy as np

    saved = tracker.read_result(run_id)
    print(
        f"reused MLflow run {run_id}: it finished with the same parameters, data and code",
        flush=True,
    )
    row = {**saved["row"], "status": "reused", "report": run.experiment, "variant": run.variant}
    summary.append_summary(row)
    _, example = example_sequence(run, data)
    fig = sequence_figure(example, run, data)
    figures.close(fig)  # as a fresh run's: shown once, where the report displays it
    return RunResult(
        row=row,
        history=saved["history"],
        report=saved["report"],
        confusion=np.array(saved["confusion"]),
        classes=saved["classes"],
        params=saved["params"],
        sequence_fig=fig,
        status="reused",
        preds=saved.get("preds", []),
        teacher=saved.get("teacher", {}),
    )


def fail_run(tracker, run_id, run: plan.Run, error: BaseException) -> RunResult:
    """A run that raised: FAILED with the reason (the traceback as failure.txt), a summary row
    with status failed; the report goes on with its other runs."""
    message = f"{type(error).__name__}: {error}"
    print(f"run failed: {run.title()}: {message}", flush=True)
    if run_id:
        tracker.fail(run_id, message, "".join(traceback.format_exception(error)))
    row = summary_row(run, "failed", run_id, error=message[:500])
    tracking.attempt("summary.csv's row", summary.append_summary, row)
    return RunResult(
        row=row,
        history=[],
        report={},
        confusion=None,
        classes=[],
        params=dict(run.params),
        status="failed",
        error=message,
    )


def rank_run(run: plan.Run, data: ImageData):
    """A DDP rank > 0: the same decision as rank 0 (reuse a finished run, else train), read from
    the tracker; it trains its share and leaves tracking, testing and summary.csv to rank 0."""
    key = tracking.run_key(run.params, data)
    if not (run.resume and tracking.Tracker(run.experiment).finished(tracking.KEY, key)):
        fit_run(run, data, None, None)


def run_experiment(run: plan.Run, data: ImageData = None, *, callbacks=(), tags=None) -> RunResult:
    """Train one planned run (see plan.plan_report) on its loaded data and track it.

    With resume (the default) a run that finished with the same parameters, data and code is
    reused, and a killed one continues from its last checkpoint in the same tracked run (on one
    process; a DDP run starts afresh). An error inside the run is contained (status "failed"); an
    interrupt marks the run KILLED and goes on. `callbacks` join the Trainer's, `tags` a new
    run's. On a DDP rank > 0 it trains its share and returns None (rank_run)."""
    data = data if data is not None else run.data.load()
    if process_rank(run.compute) > 0:
        return rank_run(run, data)
    tracker = tracking.Tracker(run.experiment)
    key = tracking.run_key(run.params, data)
    with files.lock(f"run-{key}"):  # the same run started twice at once: the second waits, reuses
        found = tracker.finished(tracking.KEY, key) if run.resume else None
        if found is not None:
            try:
                return reuse_run(tracker, found, run, data)
            except Exception as e:  # noqa: BLE001 (one unreadable run costs that run alone)
                print(
                    f"note: the finished MLflow run {found} cannot be read back "
                    f"({type(e).__name__}: {str(e)[:200]}): training it again",
                    flush=True,
                )
        resume = run.resume and run.compute.world_size == 1  # a DDP run starts afresh
        run_id, resume_from = tracker.open(key, run.title(), resume, tags)
        try:
            return train_run(run, data, tracker, run_id, resume_from, callbacks)
        except Exception as e:  # noqa: BLE001 (contained: recorded, and the report goes on)
            return fail_run(tracker, run_id, run, e)
        except BaseException:  # Ctrl-C, SIGTERM (Lightning's SystemExit), a kernel shutdown
            tracker.end(run_id, "KILLED")
            raise
