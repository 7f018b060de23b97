"""Gradient accumulation (``optim.accumulate``): the step of k micro-batches against the one-batch step."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import fast_config

from ccdist_plugin.accumulate import BatchStatistics, micro_batches
from ccdist_plugin.config import TrainConfig
from ccdist_plugin.models import cnn3, mlp
from ccdist_plugin.step import _accumulated_gradients
from ccdist_plugin.trainer import Trainer, build_loss, build_optimizer, training_step


def _batch(digits, n: int = 48):
    x, y = digits
    return x[:n].contiguous(), y[:n].contiguous()


def _teacher(width: int = 32) -> torch.nn.Module:
    torch.manual_seed(7)
    return mlp(1, 8, 10, width=width, depth=2, mean=[0.3], std=[0.4]).eval()


def _step(model, cfg: TrainConfig, x, y, phase: str, loss=None, seed: int = 0):
    """One training_step on a copy of ``model``: (parameters after the step, buffers, logged terms)."""
    model = copy.deepcopy(model)
    loss = loss if loss is not None else build_loss(cfg)
    optimizer = build_optimizer(cfg, model)
    torch.manual_seed(seed)  # the attack's random start
    terms, _ = training_step(model, loss, optimizer, x, y, cfg.eps * 0.5, cfg.optim.lr, phase, cfg)
    params = [p.detach().clone() for p in model.parameters()]
    buffers = [b.detach().clone() for b in model.buffers()]
    return params, buffers, terms


def _sgd_config(tmp_path, *overrides: str) -> TrainConfig:
    # SGD with lr 1 and no clipping: the step is minus the gradient, so the test sees the gradient itself
    base = (
        "optim.optimizer=sgd",
        "optim.momentum=0",
        "optim.lr=1.0",
        "optim.grad_clip=0",
        "optim.batch_size=48",
    )
    return fast_config(tmp_path, *base, *overrides)


@pytest.mark.parametrize(
    ("method", "phase", "shi"),
    [
        ("cc_dist", "full", 0.0),
        ("cc_dist", "ramp", 0.0),
        ("sabr", "full", 0.0),
        ("mtl_ibp", "full", 0.0),
        ("pgd_at", "full", 0.0),
        ("ce", "warmup", 0.0),
        ("cc_dist", "ramp", 0.5),  # the Shi regularizer's batch means: the whole batch's
        ("mtl_ibp", "ramp", 0.5),
    ],
)
def test_accumulated_step_equals_the_batch_step_without_batchnorm(digits, tmp_path, method, phase, shi):
    """A network without BatchNorm: k = 1, 2, 4 give the same step (parameters after it) to 1e-5."""
    x, y = _batch(digits)
    torch.manual_seed(0)
    model = mlp(1, 8, 10, width=32, depth=2, mean=[0.3], std=[0.4])  # no BatchNorm
    extra = {
        "cc_dist": ["loss.alpha=0.5"],
        "sabr": ["loss.options={lam: 0.4}"],
        "mtl_ibp": ["loss.alpha=0.5"],
    }
    teacher = _teacher() if method == "cc_dist" else None
    steps = {}
    for k in (1, 2, 4):
        cfg = _sgd_config(
            tmp_path,
            f"loss.method={method}",
            f"optim.accumulate={k}",
            f"optim.shi_lambda={shi}",
            *extra.get(method, []),
        )
        loss = build_loss(cfg, teacher)
        steps[k] = _step(model, cfg, x, y, phase, loss)
    start = [p.detach() for p in model.parameters()]
    moved = max(float((a - b).abs().max()) for a, b in zip(steps[1][0], start, strict=True))
    assert moved > 1e-3  # the step is not empty
    for k in (2, 4):
        for a, b in zip(steps[1][0], steps[k][0], strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
        assert steps[k][2]["loss"] == pytest.approx(steps[1][2]["loss"], rel=1e-5)


@pytest.mark.parametrize(
    ("method", "phase"),
    [
        ("cc_dist", "full"),
        ("cc_dist", "ramp"),  # with the Shi regularizer (its batch means are the whole batch's)
        ("sabr", "full"),
        ("mtl_ibp", "full"),
        ("pgd_at", "full"),
        ("ce", "warmup"),
    ],
)
def test_batchnorm_step_equals_the_batch_step(digits, tmp_path, method, phase):
    """A network with BatchNorm (optim.batchnorm_gradient: exact, the default): k = 1, 2, 4 give the
    same step to 1e-5. In float64 the steps agree to rounding (1e-9); the same holds in float32 up
    to float32 rounding of the gradient (checked for CC-Dist below)."""
    x, y = _batch(digits)
    torch.manual_seed(0)
    model = cnn3(1, 8, 10, width=16, channels=(4, 8), mean=[0.3], std=[0.4]).double()
    extra = {
        "cc_dist": ["loss.alpha=0.5"],
        "sabr": ["loss.options={lam: 0.4}"],
        "mtl_ibp": ["loss.alpha=0.5"],
    }
    teacher = _teacher(16).double() if method == "cc_dist" else None
    steps = {}
    for k in (1, 2, 4):
        cfg = _sgd_config(tmp_path, f"loss.method={method}", f"optim.accumulate={k}", *extra.get(method, []))
        steps[k] = _step(model, cfg, x.double(), y, phase, build_loss(cfg, teacher))
    start = [p.detach() for p in model.parameters()]
    assert max(float((a - b).abs().max()) for a, b in zip(steps[1][0], start, strict=True)) > 1e-3
    for k in (2, 4):
        for a, b in zip(steps[1][0], steps[k][0], strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-9)
        for a, b in zip(steps[1][1], steps[k][1], strict=True):  # running statistics
            torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


def test_batchnorm_gradient_modes_in_float32(digits, tmp_path):
    """float32, CC-Dist with BatchNorm: the exact mode's gradient is the one-batch gradient to float32
    rounding (1e-5 of its largest entry); the micro_batch mode's is not (it differentiates each
    micro-batch's own statistics), though its loss and running statistics are the batch's."""
    x, y = _batch(digits)
    torch.manual_seed(0)
    model = cnn3(1, 8, 10, width=16, channels=(4, 8), mean=[0.3], std=[0.4])
    teacher = _teacher(16)
    grads = {}
    for k, mode in ((1, "exact"), (2, "exact"), (4, "exact"), (2, "micro_batch")):
        cfg = _sgd_config(
            tmp_path,
            "loss.method=cc_dist",
            "loss.alpha=0.5",
            f"optim.accumulate={k}",
            f"optim.batchnorm_gradient={mode}",
        )
        net = copy.deepcopy(model).train()
        opt = build_optimizer(cfg, net)
        torch.manual_seed(0)
        training_step(net, build_loss(cfg, teacher), opt, x, y, 0.025, 0.0, "full", cfg)  # lr 0: gradient
        grads[k, mode] = [p.grad.clone() for p in net.parameters()]
    base = grads[1, "exact"]
    scale = max(float(g.abs().max()) for g in base)
    for key in ((2, "exact"), (4, "exact")):
        for a, b in zip(base, grads[key], strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5 * scale)
    micro = max(float((a - b).abs().max()) for a, b in zip(base, grads[2, "micro_batch"], strict=True))
    assert micro > 1e-3 * scale


def test_statistics_adjoint_reaches_every_batchnorm_and_stops(digits):
    """The exact mode's adjoint: after the micro-batches' backward every recorded statistic has a
    gradient; pulling it back gives gradients only to earlier BatchNorm calls, so the passes end after
    one per BatchNorm in depth."""
    x, y = _batch(digits, 16)
    torch.manual_seed(0)
    model = cnn3(1, 8, 10, width=16, channels=(4, 8), mean=[0.3], std=[0.4]).train()
    stats = BatchStatistics(gradient="exact")
    with torch.no_grad(), stats.recording(model):
        model(x)
    parts = micro_batches(16, 2)
    for part in parts:
        with stats.replaying(model):
            torch.nn.functional.cross_entropy(model(x[part]), y[part]).mul(0.5).backward()
    pending = stats.statistics_gradients()
    assert len(pending) == 3 and all(g is not None for g in pending)  # two BatchNorm2d, one BatchNorm1d
    depth = []
    while any(g is not None for g in pending):
        depth.append(max(i for i, g in enumerate(pending) if g is not None))
        for part in parts:
            with stats.replaying(model, capture=True):
                model(x[part])
            surrogate = stats.adjoint_surrogate(pending)
            surrogate.backward()
        pending = stats.statistics_gradients()
    # each pass reaches only earlier calls; the last pulls the first call's gradient into the weights
    # before it, whose input depends on no statistic
    assert depth == [2, 1, 0]
    with pytest.raises(ValueError, match="gradient must be one of"):
        BatchStatistics(gradient="approximate")


@pytest.mark.parametrize("mode", ["exact", "micro_batch"])
def test_batchnorm_statistics_and_running_averages_are_the_whole_batch(digits, tmp_path, mode):
    """With BatchNorm, k = 2 and 4 normalize with the whole batch's statistics: the logged loss and the
    running statistics after the step equal the one-batch step's (adversarial and bound passes,
    CC-Dist with the Shi regularizer, and the warm-up's clean pass); the micro-batch replay itself
    reproduces the one-batch gradient when it replays one micro-batch."""
    x, y = _batch(digits)
    torch.manual_seed(0)
    model = cnn3(1, 8, 10, width=16, channels=(4, 8), mean=[0.3], std=[0.4])
    teacher = _teacher(16)
    for phase in ("warmup", "ramp"):
        steps = {}
        for k in (1, 2, 4):
            cfg = _sgd_config(
                tmp_path,
                "loss.method=cc_dist",
                "loss.alpha=0.5",
                f"optim.accumulate={k}",
                f"optim.batchnorm_gradient={mode}",
            )
            steps[k] = _step(model, cfg, x, y, phase, build_loss(cfg, teacher))
        for k in (2, 4):
            for a, b in zip(steps[1][1], steps[k][1], strict=True):  # running mean/var, batches tracked
                torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
            for key, value in steps[1][2].items():
                assert steps[k][2][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (phase, key)

    # k = 2: as in the one-batch step, a per-channel shift before a BatchNorm (a conv bias) gets no
    # gradient in either mode (micro_batch: each micro-batch differentiates the statistics as its own)
    cfg = _sgd_config(
        tmp_path,
        "loss.method=cc_dist",
        "loss.alpha=0.5",
        "optim.accumulate=2",
        f"optim.batchnorm_gradient={mode}",
    )
    net = copy.deepcopy(model).train()
    opt = build_optimizer(cfg, net)
    torch.manual_seed(0)
    _accumulated_gradients(net, build_loss(cfg, teacher), opt, x, y, 0.025, "ramp", cfg)
    conv = net.features[1]
    assert isinstance(conv, torch.nn.Conv2d) and isinstance(net.features[2], torch.nn.BatchNorm2d)
    assert float(conv.weight.grad.abs().max()) > 1e-4
    assert float(conv.bias.grad.abs().max()) < 1e-5 * float(conv.weight.grad.abs().max()) + 1e-7

    # the replay with one micro-batch: the one-batch step's gradient
    cfg = _sgd_config(tmp_path, "loss.method=cc_dist", "loss.alpha=0.5", f"optim.batchnorm_gradient={mode}")
    grads = []
    for accumulate in (False, True):
        net = copy.deepcopy(model).train()
        loss = build_loss(cfg, teacher)
        opt = build_optimizer(cfg, net)
        torch.manual_seed(0)
        if accumulate:
            _accumulated_gradients(net, loss, opt, x, y, 0.025, "ramp", cfg)
        else:
            training_step(net, loss, opt, x, y, 0.025, 0.0, "ramp", cfg)  # lr 0: the gradient only
        grads.append([p.grad.clone() for p in net.parameters()])
    scale = max(float(g.abs().max()) for g in grads[0])  # conv biases before BatchNorm: ~0 up to rounding
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * scale)


def test_replay_refuses_passes_that_differ(digits):
    """A micro-batch pass that calls BatchNorm differently from the recorded pass is an error, not a
    silent use of the wrong statistics."""
    x, _ = _batch(digits, 8)
    torch.manual_seed(0)
    model = cnn3(1, 8, 10, width=16, channels=(4, 8), mean=[0.3], std=[0.4]).train()
    stats = BatchStatistics()
    with torch.no_grad(), stats.recording(model):
        model(x)
    with pytest.raises(RuntimeError, match="BatchNorm calls"):
        with stats.replaying(model):
            model.features[:3](x[:4])  # stops after the first BatchNorm


def test_batchnorm_accumulation_refuses_a_loss_it_cannot_split(tmp_path):
    """With BatchNorm the attack must run apart from the objective: a plain callable loss is refused
    when the Trainer is built, naming the problem."""
    cfg = fast_config(tmp_path, "optim.accumulate=2")
    model = cnn3(1, 8, 10, width=16, channels=(4, 8))

    def my_loss(model, x, y, eps):  # pragma: no cover - never called
        raise AssertionError

    with pytest.raises(ValueError, match="needs a ccdist_plugin loss"):
        Trainer(model, cfg, loss=my_loss)


def test_micro_batches_and_a_remainder_batch():
    """Equal slices when k divides the batch; a smaller final batch is split as evenly as it goes (the
    first slices one larger), and a batch smaller than k into single examples."""
    assert micro_batches(8, 4) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert [s.stop - s.start for s in micro_batches(7, 4)] == [2, 2, 2, 1]
    assert [s.stop - s.start for s in micro_batches(3, 4)] == [1, 1, 1]
    with pytest.raises(ValueError, match="accumulate"):
        micro_batches(8, 0)


def test_remainder_batch_step_equals_the_batch_step(digits, tmp_path):
    """A final batch that k does not divide (7 examples, k = 4): still the one-batch step."""
    x, y = _batch(digits, 7)
    torch.manual_seed(0)
    model = mlp(1, 8, 10, width=32, depth=2, mean=[0.3], std=[0.4])
    cfg1 = _sgd_config(
        tmp_path, "loss.method=cc_ibp", "loss.alpha=0.5", "optim.batch_size=8", "optim.shi_lambda=0"
    )
    cfg4 = _sgd_config(
        tmp_path,
        "loss.method=cc_ibp",
        "loss.alpha=0.5",
        "optim.batch_size=8",
        "optim.accumulate=4",
        "optim.shi_lambda=0",
    )
    a, _, _ = _step(model, cfg1, x, y, "full")
    b, _, _ = _step(model, cfg4, x, y, "full")
    for pa, pb in zip(a, b, strict=True):
        torch.testing.assert_close(pb, pa, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.batch_size=64", "optim.accumulate=3"], "does not divide optim.batch_size=64"),
        (["optim.accumulate=0"], "must be an integer >= 1"),
        (["optim.batchnorm_gradient=approx"], "must be 'exact' or 'micro_batch'"),
    ],
)
def test_bad_accumulate_is_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        fast_config(tmp_path, *overrides)


def test_bad_accumulate_on_the_command_line_is_one_line_exit_2(tmp_path):
    from click.testing import CliRunner

    from ccdist_plugin.cli import main

    out = tmp_path / "run"
    args = ["train", "--config", "digits", "--set", "optim.accumulate=3", "--output-dir", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith(("error:", "Error:"))]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "optim.accumulate=3 does not divide optim.batch_size=128" in lines[0]
    assert not out.exists()  # nothing written


def test_one_digits_epoch_with_k_1_and_2_ends_at_the_same_weights(digits_data, tmp_path):
    """One epoch of the digits preset's network and loss (CC-Dist on the MLP, Adam, ε ramping over
    the epoch, no Shi regularizer) with k = 1 and k = 2: the same weights to 1e-4."""
    torch.manual_seed(3)
    teacher = mlp(
        1, 8, 10, width=256, depth=2, mean=list(digits_data.spec.mean), std=list(digits_data.spec.std)
    )
    results = {}
    for k in (1, 2):
        cfg = TrainConfig.from_dict(
            {
                **_digits_preset(),
                "log": {
                    "output_dir": str(tmp_path / f"k{k}"),
                    "progress": False,
                    "tensorboard": False,
                    "plot": False,
                    "val_size": 0,
                },
            }
        ).override(
            [
                "schedule.epochs=1",
                "schedule.warmup_epochs=0",
                "schedule.ramp_up_epochs=1",
                "optim.shi_lambda=0",
                "optim.batch_size=64",
                f"optim.accumulate={k}",
                "device=cpu",
            ]
        )
        from ccdist_plugin.trainer import build_model

        torch.manual_seed(0)
        model = build_model(cfg, digits_data.spec)
        torch.manual_seed(0)
        fit = Trainer(model, cfg, teacher=teacher).fit(digits_data.train)
        results[k] = {n: p.detach().clone() for n, p in fit.model.state_dict().items()}
    start = build_model(cfg, digits_data.spec).state_dict()
    assert any(not torch.equal(results[1][n], start[n]) for n in start if start[n].is_floating_point())
    for name, value in results[1].items():
        torch.testing.assert_close(results[2][name], value, rtol=0, atol=1e-4, msg=name)


def test_one_digits_epoch_with_batchnorm_and_k_1_and_2_ends_at_the_same_weights(digits, tmp_path):
    """One epoch over the digits (1797 examples, batches of 64, the last one smaller) of a BatchNorm
    CNN with CC-Dist, Adam and ε ramping over the epoch, in float64, with k = 1 and k = 2: the same
    weights and running statistics to 1e-4. (float64: Adam divides by the gradient's running scale,
    so a conv bias before a BatchNorm, whose gradient is zero up to rounding, would follow float32
    rounding noise in either run.)"""
    x, y = digits
    x = x.double()
    torch.manual_seed(0)
    model = cnn3(1, 8, 10, width=16, channels=(4, 8), mean=[0.3], std=[0.4]).double()
    teacher = _teacher(16).double()
    batches = [slice(s, s + 64) for s in range(0, x.shape[0], 64)]
    results = {}
    for k in (1, 2):
        cfg = fast_config(
            tmp_path, "loss.method=cc_dist", "loss.alpha=0.5", "optim.batch_size=64", f"optim.accumulate={k}"
        )
        net, loss = copy.deepcopy(model), build_loss(cfg, teacher)
        optimizer = build_optimizer(cfg, net)
        torch.manual_seed(0)
        for i, b in enumerate(batches):
            eps_t = cfg.eps * (i + 1) / len(batches)
            training_step(
                net,
                loss,
                optimizer,
                x[b],
                y[b],
                eps_t,
                cfg.optim.lr,
                "ramp",
                cfg.override(["optim.shi_lambda=0"]),
            )
        results[k] = {n: t.detach().clone() for n, t in net.state_dict().items()}
    start = model.state_dict()
    assert (
        max(float((results[1][n] - start[n]).abs().max()) for n in start if start[n].is_floating_point())
        > 1e-3
    )
    for name, value in results[1].items():
        torch.testing.assert_close(results[2][name], value, rtol=0, atol=1e-4, msg=name)


def _digits_preset() -> dict:
    from ccdist_plugin.config import load_preset

    data = load_preset("digits").to_dict()
    data.pop("log", None)
    data["teacher"] = {"checkpoint": None}
    return data
