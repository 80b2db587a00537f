"""Training with Lightning: SeqClassifier (the fast path: uint8 batches normalised, augmented and
turned into sequences on the device; an optional Teacher), its optimizers and schedules, the
callbacks that print and time epochs, the Trainer, and the best checkpoint scored on the test
split."""

from __future__ import annotations

import sys
import time
import warnings
from functools import partial

import torch
import torch.nn.functional as F

from seqlstm import Batches, augment_with_flips, distillation_loss, normalize

import pytorch_lightning as pl


# Lightning 2.6 calls a torch.utils._pytree API that torch 2.15 deprecates, once per batch transfer.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


from torch.optim.lr_scheduler import (  # noqa: E402
    CosineAnnealingLR,
    LinearLR,
    OneCycleLR,
    SequentialLR,
)


OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "rmsprop": torch.optim.RMSprop,
    "sgd": partial(torch.optim.SGD, momentum=0.9, nesterov=True),
}  # (params, lr=, weight_decay=)


def _warmup_cosine(opt, lr, steps, warmup_steps):
    """Linear warm-up from lr / (warmup_steps + 1) to lr, then cosine decay to 0 over the rest."""
    warmup = LinearLR(opt, start_factor=1 / (warmup_steps + 1), total_iters=warmup_steps)
    decay = CosineAnnealingLR(opt, T_max=steps - warmup_steps)
    return SequentialLR(opt, [warmup, decay], [warmup_steps])


SCHEDULES = {  # (optimizer, peak lr, total steps, warm-up steps) -> a per-step scheduler, or None
    "onecycle": lambda opt, lr, steps, warmup: OneCycleLR(  # each group's own peak (param_groups)
        opt, [g["lr"] for g in opt.param_groups], total_steps=steps, pct_start=0.15
    ),
    "none": lambda opt, lr, steps, warmup: None,
    "cosine": lambda opt, lr, steps, warmup: CosineAnnealingLR(opt, T_max=steps),
    "warmup_cosine": _warmup_cosine,
}


PRECISIONS = ("32", "bf16-mixed")  # Lightning's precision


STRATEGIES = ("auto", "ddp")  # Lightning's; ddp: one process per device (a script, not a notebook)


# compile: true (torch.compile, inductor) for these models only, each for its measured training
# speed-up on 2 CPU cores (docs/speed.md); a cold compile costs about a minute per run.
COMPILED = {
    "trellisnet": "11 levels of element-wise gates fused into a few C++ loops",
    "bilstm_fc": "the per-step gate arithmetic of its recurrence loop fused",
}
NOT_COMPILED = {  # why compile is refused for a model
    "s4d": "0.99x since its kernel is factorised: inductor leaves complex products and FFTs to "
    "eager kernels",
    "lipschitz_rnn": "compiling its 1,024-step Python loop fails (RecursionError)",
    "lstm": "nn.LSTM's fused kernel leaves nothing to fuse (0.98x on rows)",
    "gru": "nn.GRU's fused kernel leaves nothing to fuse",
    "rnn": "nn.RNN's fused kernel leaves nothing to fuse",
}


def compiled(model, compile=False):
    """The model with its forward compiled in place (nn.Module.compile: parameter names, and so
    checkpoints, stay those of the eager model), if `compile`."""
    if compile:
        model.compile()
    return model


class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient: the run stops at once (going on only spreads NaN)."""


def param_groups(model, lr, weight_decay):
    """The optimizer's parameter groups: every trainable parameter at (lr, weight_decay), except
    those that declare their own in a `_optim` dict (the S4 authors' convention: S4D's A and dt
    train at a smaller lr with no weight decay). One group per distinct setting; pass the groups'
    lr to schedules that set their own (OneCycleLR's max_lr)."""
    groups = {}
    for p in model.parameters():
        if p.requires_grad:
            setting = {"lr": lr, "weight_decay": weight_decay, **getattr(p, "_optim", {})}
            groups.setdefault(tuple(sorted(setting.items())), []).append(p)
    return [{"params": params, **dict(setting)} for setting, params in groups.items()]


class SeqClassifier(pl.LightningModule):
    """Wraps a sequence model; turns uint8 image batches into normalised sequences on the device.

    A non-finite loss or gradient raises NonFiniteError naming the epoch and step. Checkpoints
    carry what Lightning does not restore by itself (the augmentation generator, the CPU RNG, the
    per-epoch history), so that a resumed run continues exactly where it stopped. With a `teacher`
    (a Teacher, never a submodule) the training loss is distillation_loss against its logits for
    the same augmented images; training batches then carry their indices when it has a table."""

    def __init__(
        self,
        model,
        *,
        to_seq,
        mean,
        std,
        augment="none",
        lr=1e-3,
        weight_decay=0.0,
        optimizer="adam",
        schedule="onecycle",
        warmup_epochs=0,
        label_smoothing=0.0,
        seed=0,
        teacher=None,
        distill_alpha=0.5,
        distill_T=4.0,
        distill_hard=False,
    ):
        super().__init__()
        self.model, self.to_seq, self.teacher = model, to_seq, teacher
        self.save_hyperparameters(ignore=["model", "to_seq", "mean", "std", "teacher"])
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
        self.augment_gen = torch.Generator().manual_seed(seed)
        self.history, self._sums = (
            [],
            {},
        )  # per-epoch metrics; running (loss sum, correct, count) per stage
        self._grad_norms, self._step_in_epoch = [], 0

    def sequences(self, x_uint8):  # the evaluation path; training augments first (train_loss)
        return self.to_seq(normalize(x_uint8, self.mean, self.std))  # (B, T, F)

    def forward(self, x_uint8):
        return self.model(self.sequences(x_uint8))

    def _step(self, stage, logits, y, loss=None):
        loss = F.cross_entropy(logits, y) if loss is None else loss
        correct = (logits.argmax(1) == y).sum()
        sums = torch.stack([loss.detach() * len(y), correct, y.new_tensor(len(y))])
        self._sums[stage] = self._sums.get(stage, 0) + sums
        self.log(f"{stage}_loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log(
            f"{stage}_acc",
            correct / len(y),
            on_step=False,
            on_epoch=True,
            prog_bar=True,
            sync_dist=True,
        )
        return loss

    def _non_finite(self, what, value):
        return NonFiniteError(
            f"non-finite {what} ({value}) at epoch {self.current_epoch + 1}, step "
            f"{self._step_in_epoch}: lower lr (now {self.hparams.lr:g}) or set grad_clip (e.g. 1.0)"
        )

    def train_loss(self, x_uint8, y, idx=None):
        """(loss, logits) of a training batch: cross-entropy (label-smoothed if set), or with a
        teacher the distillation loss against its logits for the same augmented images (idx:
        their indices)."""
        hp = self.hparams
        cutout = "cutout" in hp.augment  # its fill: the mean pixel, zero once normalised
        fill = (self.mean * 255).round().to(torch.uint8) if cutout else None
        x_uint8, flip = augment_with_flips(
            x_uint8, hp.augment, self.augment_gen, fill
        )  # uint8: 1/4 of the bytes
        logits = self.model(self.to_seq(normalize(x_uint8, self.mean, self.std)))
        if self.teacher is None:
            return F.cross_entropy(logits, y, label_smoothing=hp.label_smoothing), logits
        teacher_logits = self.teacher.logits(x_uint8, idx, flip)
        return distillation_loss(
            logits,
            teacher_logits,
            y,
            alpha=hp.distill_alpha,
            temperature=hp.distill_T,
            hard=hp.distill_hard,
        ), logits

    def training_step(self, batch, batch_idx):
        x, y, *idx = batch  # (x, y) or, for a teacher's table, (x, y, indices)
        self._step_in_epoch = batch_idx + 1
        loss, logits = self.train_loss(x, y, *idx)
        loss = self._step("train", logits, y, loss)
        if not torch.isfinite(loss):
            raise self._non_finite("training loss", float(loss.detach()))
        return loss

    def on_before_optimizer_step(
        self, optimizer
    ):  # gradients as backward left them, before clipping
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            if not torch.isfinite(norm):
                raise self._non_finite("gradient norm", float(norm))
            self._grad_norms.append(norm.detach())

    def on_fit_start(self):
        if self.teacher is not None:
            self.teacher.to(self.device)

    def on_train_epoch_start(self):  # before the epoch's first batch is drawn (iteration is lazy)
        loader = self.trainer.train_dataloader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.current_epoch)

    def validation_step(self, batch, _):
        x, y = batch
        self._step("val", self(x), y)

    def predict_step(self, batch, _):
        return self(batch[0]).argmax(1)

    def on_validation_epoch_end(self):  # runs after the epoch's last training batch
        record = {"epoch": self.current_epoch + 1}
        for stage, sums in self._sums.items():  # summed over ranks under DDP
            loss, correct, n = self.trainer.strategy.reduce(sums, reduce_op="sum")
            record.update({f"{stage}_loss": float(loss / n), f"{stage}_acc": float(correct / n)})
        if self._grad_norms:  # the ranks' gradients are all-reduced: every rank sees the same norms
            norms = torch.stack(self._grad_norms)
            record.update(grad_norm_mean=float(norms.mean()), grad_norm_max=float(norms.max()))
        record["lr"] = self.trainer.optimizers[0].param_groups[0]["lr"]  # where the schedule stands
        self._sums, self._grad_norms = {}, []
        if not self.trainer.sanity_checking:
            self.history.append(record)
            self.log_dict({k: v for k, v in record.items() if k.startswith(("grad_norm", "lr"))})

    def on_save_checkpoint(self, checkpoint):
        checkpoint["seqlstm"] = {
            "augment_gen": self.augment_gen.get_state(),
            "history": self.history,
            "cpu_rng": torch.get_rng_state(),
        }

    def on_load_checkpoint(self, checkpoint):
        state = checkpoint.get("seqlstm")
        if (
            state and self._trainer is not None and self.trainer.state.fn == "fit"
        ):  # not when testing "best"
            self.augment_gen.set_state(state["augment_gen"])
            torch.set_rng_state(state["cpu_rng"])
            self.history = list(state["history"])

    def configure_optimizers(self):
        hp = self.hparams
        opt = OPTIMIZERS[hp.optimizer](
            param_groups(self, hp.lr, hp.weight_decay), lr=hp.lr, weight_decay=hp.weight_decay
        )
        steps = int(self.trainer.estimated_stepping_batches)
        warmup = min(steps - 1, hp.warmup_epochs * steps // max(1, self.trainer.max_epochs))
        scheduler = SCHEDULES[hp.schedule](opt, hp.lr, steps, warmup)
        if scheduler is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class EpochLog(pl.Callback):
    """One line per epoch with metrics and time left: a progress report that reads well in a
    rendered notebook, where a per-step bar would print hundreds of lines. Time left comes from
    the last `recent` epochs' pace: a run slowed at first by another job would otherwise report
    its early pace long after it sped up. An epoch longer than `every` seconds (a pixel model's
    epoch on a CPU takes a quarter of an hour) also gets a line every `every` seconds."""

    def __init__(self, recent=3, every=120.0):
        self.recent, self.every = recent, every

    def on_train_start(self, trainer, module):
        self._ends = [time.perf_counter()]

    def on_train_epoch_start(self, trainer, module):
        self._start = self._said = time.perf_counter()
        self._images = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, i):
        self._images += len(batch[1])
        now = time.perf_counter()
        if now - self._said < self.every or not trainer.is_global_zero:
            return
        self._said, n = now, trainer.num_training_batches
        left = (now - self._start) * (n - i - 1) / (i + 1)
        print(
            f"  epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: batch {i + 1:,}/{n:,} "
            f"({100 * (i + 1) / n:.0f}%), {self._images / (now - self._start):,.0f} images/s, "
            f"epoch's training ends in {left / 60:.1f} min",
            flush=True,
        )

    def on_train_epoch_end(self, trainer, module):  # after this epoch's validation
        if not module.history or not trainer.is_global_zero:
            return
        self._ends.append(time.perf_counter())
        ends = self._ends[-self.recent - 1 :]
        per_epoch = (ends[-1] - ends[0]) / (len(ends) - 1)
        epoch, total = trainer.current_epoch + 1, trainer.max_epochs
        shown = ("train_loss", "train_acc", "val_loss", "val_acc")
        metrics = "  ".join(f"{k} {v:.4f}" for k, v in module.history[-1].items() if k in shown)
        print(
            f"epoch {epoch:>3}/{total}  {metrics}  {per_epoch:.1f} s/epoch, "
            f"{per_epoch * (total - epoch) / 60:.1f} min left",
            flush=True,
        )


class TrainTimer(pl.Callback):
    """Seconds spent in training batches (forward, backward, step; validation excluded), the
    images they saw, and the wall time of fit. The totals live in checkpoints, so a resumed run
    continues them; the device is synchronised before each clock read."""

    def __init__(self):
        self.seconds, self.images, self.wall = 0.0, 0, 0.0

    def on_train_start(self, trainer, module):
        self._mark = time.perf_counter()

    def _now(self, module):
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        return time.perf_counter()

    def on_train_batch_start(self, trainer, module, batch, i):
        self._t = self._now(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, i):
        self.seconds += self._now(module) - self._t
        self.images += len(batch[1])

    def on_validation_end(
        self, trainer, module
    ):  # before ModelCheckpoint saves (Lightning runs it last)
        now = time.perf_counter()
        self.wall, self._mark = self.wall + now - self._mark, now

    def state_dict(self):
        return {"seconds": self.seconds, "images": self.images, "wall": self.wall}

    def load_state_dict(self, state):
        self.seconds, self.images, self.wall = state["seconds"], state["images"], state["wall"]


def make_trainer(train, compute, *, checkpoints, steps_per_epoch, logger=False, callbacks=()):
    """A Trainer for a run's TrainSpec and ComputeSpec (`devices`, `num_nodes` and `strategy` go
    to Lightning) keeping best.ckpt and last.ckpt in `checkpoints`; `logger` is the tracker's
    (False on DDP ranks > 0), `callbacks` run before the epoch line is printed. Returns (trainer,
    timer)."""
    from pytorch_lightning.callbacks import ModelCheckpoint, TQDMProgressBar

    best = ModelCheckpoint(
        dirpath=checkpoints, filename="best", monitor="val_acc", mode="max", save_top_k=1
    )  # DDP: rank 0's dirpath is broadcast
    # last.ckpt after every epoch: Lightning's save_last writes it only when the best changes, and
    # a run killed after epochs that did not improve would resume before them and log them again
    last = ModelCheckpoint(
        dirpath=checkpoints,
        filename="last",
        save_top_k=1,
        every_n_epochs=1,
        enable_version_counter=False,
    )  # no monitor: the latest epoch's
    timer = TrainTimer()
    on_terminal = sys.stderr.isatty()  # a per-step bar in a terminal; in a notebook, epoch lines
    callbacks = [best, last, timer, *callbacks, EpochLog()] + [TQDMProgressBar()] * on_terminal
    trainer = pl.Trainer(
        max_epochs=train.epochs,
        gradient_clip_val=train.grad_clip or None,
        logger=logger,
        precision=str(train.precision),
        num_sanity_val_steps=0,
        log_every_n_steps=steps_per_epoch,
        enable_progress_bar=on_terminal,
        callbacks=callbacks,
        enable_model_summary=False,
        deterministic=True if not torch.cuda.is_available() else "warn",
        accelerator="auto",
        devices=compute.devices,
        num_nodes=compute.num_nodes,
        strategy=compute.strategy,
    )
    return trainer, timer


def predict_best(trainer, module, batches):
    """Class predictions of the best-validation checkpoint, in this process alone: after a DDP fit,
    rank 0 tests once instead of every rank predicting the whole test split."""
    state = torch.load(
        trainer.checkpoint_callback.best_model_path, map_location=module.device, weights_only=True
    )
    module.load_state_dict(state["state_dict"])
    module.eval()
    with torch.inference_mode(), trainer.precision_plugin.predict_step_context():
        return torch.cat([module(x.to(module.device)).argmax(1).cpu() for x, _ in batches])


def test_scores(preds, data):
    """Test predictions scored: (metrics, classification report, confusion, predictions)."""
    import numpy as np
    from sklearn.metrics import classification_report, confusion_matrix, f1_score

    y, labels = data.test_y.numpy(), list(range(len(data.classes)))
    report = classification_report(
        y, preds, labels=labels, target_names=data.classes, output_dict=True, zero_division=0
    )
    metrics = {
        "test_acc": float(np.mean(preds == y)),
        "macro_f1": float(f1_score(y, preds, average="macro")),
    }
    return metrics, report, confusion_matrix(y, preds, labels=labels), preds


def evaluate(trainer, module, data, eval_batch):
    """The best-validation checkpoint on the test split: test_scores; the module keeps the
    checkpoint's weights."""
    return test_scores(
        predict_best(trainer, module, Batches(data.test_x, data.test_y, eval_batch)).numpy(), data
    )
