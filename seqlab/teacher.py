"""The teacher of a distilled run: trained once per (data, teacher, arguments, epochs, recipe) by
TEACHER_RECIPE in a tracked run of its own, kept in the cache folder and as that run's artifact,
found there by every later run and report (on this machine or another on the same server)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytorch_lightning as pl
import torch

from seqlstm import (
    Batches,
    ImageData,
    Teacher,
    build_teacher,
    cache_dir,
    count_params,
    logits_table,
)
from seqlab import files, lightning, plan, tracking

TEACHER_RECIPE = {  # how every teacher trains, teacher_epochs long; part of its cache key
    "batch_size": 512,  # images per step
    "optimizer": "sgd",  # SGD, Nesterov momentum 0.9
    "lr": 0.2,  # peak of the one-cycle schedule (15% warm-up, then cosine decay)
    "schedule": "onecycle",
    "weight_decay": 5e-4,  # L2 penalty, as torch's SGD couples it to the lr
    "label_smoothing": 0.2,  # airbench's
    "augment": "flip_crop",  # mirror + reflect-padded random crops (side // 8), on uint8 batches
    "tta": "flip_shift",  # TEST_VIEWS: its accuracy and logits average 6 views, as airbench's
}
TEACHER_EXPERIMENT = "seqlstm-teachers"  # one MLflow experiment holds the teachers of every report


def teacher_key(run: plan.Run, data: ImageData) -> str:
    """The teacher's identity: the data (dataset, image policy, split seed: data_fingerprint), its
    name, arguments, epochs and recipe; not the code's hash, so an edit elsewhere keeps it."""
    d = run.distill
    ident = {
        "data": tracking.data_fingerprint(data),
        "teacher": d.teacher,
        "args": d.teacher_args,
        "epochs": d.teacher_epochs,
        "recipe": TEACHER_RECIPE,
        "seed": run.data.split_seed,  # one teacher per split, whatever the students' seeds
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _save_teacher(saved: dict, path: Path):
    """{"state_dict", "table"} as tensors and its info as JSON text, so that reading it needs no
    pickle (torch.load with weights_only=True); written under a temporary name, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(
        {
            "state_dict": saved["state_dict"],
            "table": saved["table"],
            "info_json": json.dumps(saved["info"]),
        },
        tmp,
    )
    os.replace(tmp, path)


def _set_aside(path: Path, why: str):
    files.set_aside(path, f"the cached teacher {path} {why}", "fetching or training it again")


def _read_teacher(path: Path, data: ImageData):
    """A cached teacher ({"state_dict", "info", "table"}) if `path` holds a readable one made for
    these classes and image shape. Nothing in it runs (weights_only); a file that cannot be read
    (truncated, or not tensors and JSON) is named, set aside and rebuilt; a mismatch is said."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        info = json.loads(saved.pop("info_json"))
    except Exception as e:  # noqa: BLE001 (any unreadable file: the teacher is rebuilt)
        return _set_aside(path, f"cannot be read ({type(e).__name__}: {str(e)[:200]})")
    if info["classes"] != data.classes or tuple(info["image_shape"]) != data.image_shape:
        print(
            f"note: the cached teacher {path} was trained on {len(info['classes'])} classes of "
            f"{tuple(info['image_shape'])} images, not this data's {len(data.classes)} classes "
            f"of {data.image_shape}: training it again",
            flush=True,
        )
        return None
    return {**saved, "info": info}


def _download_teacher(key: str, path: Path, data: ImageData):
    """The teacher trained by another machine on the same tracking server, copied into the cache."""
    tracker = tracking.Tracker(TEACHER_EXPERIMENT)
    run_id = tracker.finished("seqlstm.teacher_key", key)
    if run_id is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # the same filesystem: a rename
        os.replace(tracker.download(run_id, "teacher.pt", tmp), path)
    print(f"teacher {key} fetched from MLflow run {run_id}", flush=True)
    return _read_teacher(path, data)


def _teacher_module(run: plan.Run, data: ImageData):
    """(the teacher's network, its input, its Lightning module by TEACHER_RECIPE)."""
    r, d = TEACHER_RECIPE, run.distill
    model, to_input = build_teacher(d.teacher, d.teacher_args, data.image_shape, len(data.classes))
    module = lightning.SeqClassifier(
        model,
        to_seq=to_input,
        mean=data.mean,
        std=data.std,
        augment=r["augment"],
        lr=r["lr"],
        weight_decay=r["weight_decay"],
        optimizer=r["optimizer"],
        schedule=r["schedule"],
        seed=run.data.split_seed,
        label_smoothing=r["label_smoothing"],
    )
    return model, to_input, module


def _teacher_info(run, data, module, timer, one_view, scores, run_id):
    metrics, report, cm, preds = scores
    d = run.distill
    return {
        "name": d.teacher,
        "args": d.teacher_args,
        "epochs": d.teacher_epochs,
        "recipe": TEACHER_RECIPE,
        "classes": data.classes,
        "image_shape": list(data.image_shape),
        "dataset": data.name,
        **metrics,
        "test_acc_one_view": one_view["test_acc"],
        "train_seconds": round(timer.wall, 1),
        "train_images_per_s": round(timer.images / max(timer.seconds, 1e-9)),
        "report": report,
        "confusion": cm.tolist(),
        "preds": preds.tolist(),
        "mlflow_run_id": run_id,
        "history": module.history,
    }


def _fit_teacher(run: plan.Run, data: ImageData, tracker, run_id) -> dict:
    """Train the teacher by TEACHER_RECIPE; its best-validation weights, info and logits table."""
    r, d = TEACHER_RECIPE, run.distill
    pl.seed_everything(run.data.split_seed, workers=True, verbose=False)
    model, to_input, module = _teacher_module(run, data)
    tracker.log_params(
        run_id,
        {
            "teacher": d.teacher,
            "teacher_args": d.teacher_args,
            "epochs": d.teacher_epochs,
            **r,
            "dataset": data.name,
            "data_source": data.source,
            "n_params": count_params(model),
        },
    )
    train = Batches(
        data.train_x, data.train_y, r["batch_size"], shuffle=True, seed=run.data.split_seed
    )
    recipe = dataclasses.replace(run.train, epochs=d.teacher_epochs, grad_clip=0.0)
    trainer, timer = lightning.make_trainer(
        recipe,
        run.compute,
        checkpoints=files.checkpoint_dir(run_id),
        steps_per_epoch=len(train),
        logger=tracker.lightning_logger(run_id),
    )
    print(
        f"training the teacher {d.teacher} on {data.name} for {d.teacher_epochs} epochs", flush=True
    )
    trainer.fit(module, train, Batches(data.val_x, data.val_y, 512))
    one_view = lightning.evaluate(trainer, module, data, 512)[
        0
    ]  # the module keeps the best weights
    teacher = Teacher(module.model, to_input, data.mean, data.std, tta=r["tta"])
    answers = torch.cat([teacher.live(x).argmax(1) for x in data.test_x.split(512)]).numpy()
    scores = lightning.test_scores(answers, data)
    info = _teacher_info(run, data, module, timer, one_view, scores, run_id)
    return {
        "state_dict": module.model.state_dict(),
        "info": info,
        "table": logits_table(teacher, data.train_x),
    }


def train_teacher(run: plan.Run, data: ImageData, key: str, path: Path) -> dict:
    """Train the teacher in a tracked run of its own (tagged with its key), then keep it in the
    cache folder and as that run's artifact teacher.pt."""
    tracker = tracking.Tracker(TEACHER_EXPERIMENT)
    run_id = tracker.create(f"{run.distill.teacher} on {data.name}", {"seqlstm.teacher_key": key})
    try:
        saved = _fit_teacher(run, data, tracker, run_id)
    except BaseException:
        tracker.end(run_id, "FAILED")
        raise
    saved["info"]["key"] = key
    _save_teacher(saved, path)
    with tempfile.TemporaryDirectory() as tmp:  # the cache file, as teacher.pt of its run
        tracker.log_file(run_id, shutil.copy(path, Path(tmp) / "teacher.pt"))
    tracker.log_metrics(
        run_id, {k: saved["info"][k] for k in ("test_acc", "macro_f1", "train_seconds")}
    )
    tracker.tag(run_id, {tracking.STATUS: "ok"})
    tracker.end(run_id)
    return saved


_WHOLE_SPLITS = {}  # DataSpec.key -> the data without limit_train, loaded once per process


def teacher_data(run: plan.Run, data: ImageData) -> ImageData:
    """What the teacher learns from: the whole training split, whatever the student's
    limit_train. A student's N images are that split's first N (load_dataset), so one teacher
    and its logits table serve every limit; checked, since the table is indexed by position."""
    if not run.data.limit_train:
        return data
    spec = dataclasses.replace(run.data, limit_train=0)
    if spec.key not in _WHOLE_SPLITS:
        _WHOLE_SPLITS[spec.key] = spec.load()
    whole = _WHOLE_SPLITS[spec.key]
    n = len(data.train_y)
    first_n = whole.train_x[:n], whole.train_y[:n]
    if not (torch.equal(first_n[0], data.train_x) and torch.equal(first_n[1], data.train_y)):
        raise RuntimeError(
            f"limit_train = {n}: the student's training images are not the first {n} of the "
            f"whole training split, so the teacher's logits table cannot be indexed by position"
        )
    return whole


def teacher_for(run: plan.Run, data: ImageData) -> Teacher:
    """The run's trained teacher, from the cache folder, else from its tracked run (trained on
    another machine), else trained now on the whole training split (teacher_data); under the
    key's lock, so concurrent reports train it once. It keeps its logits table, cut to the
    student's images, only for augment none or flip (crops: the teacher runs live)."""
    whole, d = teacher_data(run, data), run.distill
    key = teacher_key(run, whole)
    path = cache_dir() / "teachers" / f"{d.teacher}-{key}.pt"
    with files.lock(f"teacher-{key}", cache_dir() / ".locks"):  # shared by every outputs/
        saved = (
            _read_teacher(path, whole)
            or _download_teacher(key, path, whole)
            or train_teacher(run, whole, key, path)
        )
    model, to_input = build_teacher(d.teacher, d.teacher_args, data.image_shape, len(data.classes))
    model.load_state_dict(saved["state_dict"])
    keep = run.train.augment in ("none", "flip")
    table = saved["table"][: len(data.train_y)] if keep else None
    return Teacher(
        model,
        to_input,
        whole.mean,  # the teacher's own normalisation: that of the split it learnt from
        whole.std,
        table=table,
        info={**saved["info"], "key": key},
        tta=saved["info"]["recipe"].get("tta", "none"),
    )  # older caches had no tta
