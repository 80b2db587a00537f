"""Training strategies: each parameter changes what it claims, is checked before training and is
logged with the run (optimizers, schedules, init, label smoothing, cutout, precision)."""

import pytest
import torch
import torch.nn.functional as F

import seqlstm
from seqlab import lightning, plan, runner, schema, tracking


def test_sgd_is_nesterov_with_momentum_and_every_optimizer_builds():
    w = torch.nn.Parameter(torch.zeros(3))
    group = lightning.OPTIMIZERS["sgd"]([w], lr=0.1, weight_decay=0.0).param_groups[0]
    assert group["momentum"] == 0.9 and group["nesterov"] is True
    assert sorted(lightning.OPTIMIZERS) == ["adam", "adamw", "rmsprop", "sgd"]
    assert isinstance(
        lightning.OPTIMIZERS["rmsprop"]([w], lr=0.1, weight_decay=0.0), torch.optim.RMSprop
    )


def lrs(schedule, steps=20, warmup=5, lr=1.0):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = lightning.SCHEDULES[schedule](opt, lr, steps, warmup)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        if scheduler:
            scheduler.step()
    return out


def test_warmup_raises_the_learning_rate_over_its_steps_then_cosine_decays():
    values = lrs("warmup_cosine")
    assert all(a < b for a, b in zip(values[:5], values[1:6]))  # rising over the 5 warm-up steps
    assert values[5] == pytest.approx(1.0)  # the peak
    assert all(a > b for a, b in zip(values[5:], values[6:]))  # then falling
    assert values[0] < 0.2 and values[-1] < 0.05
    cosine = lrs("cosine")
    assert cosine[0] == pytest.approx(1.0) and all(a > b for a, b in zip(cosine, cosine[1:]))
    assert lrs("none") == [1.0] * 20
    onecycle = lrs("onecycle")
    assert onecycle.index(max(onecycle)) == 2 and onecycle[-1] < 0.01  # peak after 15% of the steps


def recurrent_blocks(model):
    """(W_hh gate block, gates) of every recurrent layer."""
    for rnn in (m for m in model.modules() if isinstance(m, torch.nn.RNNBase)):
        gates = {"LSTM": 4, "GRU": 3}.get(rnn.mode, 1)
        for name, p in rnn.named_parameters():
            if name.startswith("weight_hh"):
                yield from ((block, rnn, name) for block in p.detach().chunk(gates))


@pytest.mark.parametrize(
    "name,args",
    [
        ("bilstm_fc", {}),
        ("bilstm_fc", {"cell": "gru", "layers": 2}),
        ("lstm", {"layers": 2}),
        ("gru", {}),
    ],
)
def test_orthogonal_init_gives_orthogonal_hidden_weights_and_forget_bias_one(name, args):
    def orthogonal(model):
        return all(
            torch.allclose(b @ b.T, torch.eye(len(b)), atol=1e-5)
            for b, _, _ in recurrent_blocks(model)
        )

    torch.manual_seed(0)
    model = seqlstm.create_model(name, in_features=12, num_classes=3, hidden=8, **args)
    assert not orthogonal(model)  # PyTorch's default: uniform, not orthogonal
    seqlstm.INITS["orthogonal"](model)
    assert orthogonal(model)
    for rnn in (m for m in model.modules() if isinstance(m, torch.nn.LSTM)):
        total = sum(
            p.detach()
            for n, p in rnn.named_parameters()
            if n.startswith("bias") and n.endswith("l0")
        )
        i, f, g, o = total.chunk(4)
        assert torch.equal(f, torch.ones(8)) and not (i.any() or g.any() or o.any())
    if name == "bilstm_fc":
        G = model.recur[0].weight_ih_l0.shape[0]
        assert torch.equal(model.recur[0].weight_ih_l0, torch.eye(G))  # the frozen identity stays
        bound = (6 / (12 + 8)) ** 0.5  # Xavier's bound for a (H, F) gate block
        assert (
            model.in_proj.weight.abs().max() <= bound
            and model.in_proj.weight.abs().max() > 0.8 * bound
        )


def test_label_smoothing_applies_to_the_training_loss_only():
    module = lightning.SeqClassifier(
        torch.nn.Identity(),
        to_seq=lambda x: x.flatten(1),
        mean=[0.5],
        std=[0.2],
        label_smoothing=0.3,
    )
    module.log = lambda *a, **k: None  # no trainer here
    x = torch.randint(
        0, 256, (6, 1, 1, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    y = torch.arange(6) % 4
    loss, logits = module.train_loss(x, y)  # the images' normalised values are the logits here
    torch.testing.assert_close(loss, F.cross_entropy(logits, y, label_smoothing=0.3))
    torch.testing.assert_close(module._step("val", logits, y), F.cross_entropy(logits, y))


def test_cutout_fills_one_square_of_half_the_side_with_the_fill_value():
    x = torch.full((64, 3, 8, 8), 200, dtype=torch.uint8)
    fill = torch.tensor([1, 2, 3], dtype=torch.uint8)
    out = seqlstm.batch_cutout(x, fill, torch.Generator().manual_seed(0))
    holes = out[:, 0] == 1  # (B, H, W)
    assert torch.equal(out[:, 1][holes], torch.full_like(out[:, 1][holes], 2)) and torch.equal(
        out.permute(1, 0, 2, 3)[:, ~holes], x.permute(1, 0, 2, 3)[:, ~holes]
    )  # only the holes changed
    for hole in holes:
        rows, cols = hole.any(1).nonzero().flatten(), hole.any(0).nonzero().flatten()
        assert 2 <= len(rows) <= 4 and 2 <= len(cols) <= 4  # a 4x4 square, clipped at the border
        assert hole.sum() == len(rows) * len(
            cols
        )  # a rectangle: the square's part inside the image
    assert (holes.sum((1, 2)) == 16).any() and (holes.sum((1, 2)) < 16).any()
    combined = seqlstm.augment_batch(x, "flip_crop_cutout", torch.Generator().manual_seed(0), fill)
    assert (combined[:, 0] == 1).any() and not (
        seqlstm.augment_batch(x, "flip_crop")[:, 0] == 1
    ).any()


def test_every_strategy_runs_is_logged_and_the_schedule_warms_up(outputs, quick_report):
    strategy = {
        "optimizer": "rmsprop",
        "schedule": "warmup_cosine",
        "warmup_epochs": 2,
        "init": "orthogonal",
        "label_smoothing": 0.1,
        "augment": "flip_crop_cutout",
        "precision": "bf16-mixed",
        "grad_clip": 1.0,
        "weight_decay": 1e-4,
        "model_args": {"dropout": 0.1},
    }
    runs, loaded = quick_report(epochs=4, lr=0.003, **strategy)
    r = runner.run_experiment(runs[0], loaded[runs[0].data.key])
    assert r.status == "ok", r.error
    lr = [h["lr"] for h in r.history]
    assert lr[0] < lr[1] and lr[1] > lr[2] > lr[3]  # warm-up over 2 epochs, then decay
    assert all(h["grad_norm_max"] >= h["grad_norm_mean"] > 0 for h in r.history)
    client, _ = tracking.Tracker("runs").mlflow()
    run = client.get_run(r.row["mlflow_run_id"])
    for key, value in strategy.items():
        assert run.data.params[key] == str(value)
    assert len(client.get_metric_history(run.info.run_id, "grad_norm_max")) == 4  # one per epoch


def test_variants_run_for_every_model_and_per_model_may_set_the_transform():
    types = schema.types()
    params = {
        **schema.defaults(),
        "model": ["bilstm_fc", "lstm"],
        "seq_len": 20,
        "per_model": {"lstm": {"transform": "rows"}},
        "variants": {"adam": {}, "sgd": {"optimizer": "sgd", "lr": 0.05}},
    }
    runs = plan.plan_report(params, types)
    assert [(r.model, r.transform, r.seq_len, r.variant, r.params["optimizer"]) for r in runs] == [
        ("bilstm_fc", "identity", 20, "adam", "adam"),
        ("bilstm_fc", "identity", 20, "sgd", "sgd"),
        ("lstm", "rows", None, "adam", "adam"),
        ("lstm", "rows", None, "sgd", "sgd"),
    ]
    assert (
        runs[1].params["lr"] == 0.05
        and runs[1].title() == "cifar10, bilstm_fc, identity, L = 20, sgd"
    )
    with pytest.raises(
        ValueError, match=r"variants\['sgd'\]: parameter optimizer = 'sgdd': valid values"
    ):
        plan.plan_report({**params, "variants": {"sgd": {"optimizer": "sgdd"}}}, types)
    with pytest.raises(
        ValueError, match=r"variants\['rows'\]: unknown parameter\(s\) \['transform'\]"
    ):
        plan.plan_report({**params, "variants": {"rows": {"transform": "rows"}}}, types)
