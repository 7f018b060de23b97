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


def test_batchnorm_statistics_and_running_averages_are_the_whole_batch(digits, tmp_path):
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
            cfg = _sgd_config(tmp_path, "loss.method=cc_dist", "loss.alpha=0.5", f"optim.accumulate={k}")
            steps[k] = _step(model, cfg, x, y, phase, build_loss(cfg, teacher))
        for k in (2, 4):
            for a, b in zip(steps[1][1], steps[k][1], strict=True):  # running mean/var, batches tracked
                torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
            for key, value in steps[1][2].items():
                assert steps[k][2][key] == pytest.approx(value, rel=1e-5, abs=1e-7), (phase, key)

    # k = 2: as in the one-batch step, a per-channel shift before a BatchNorm (a conv bias) gets no
    # gradient: each micro-batch differentiates the statistics as its own
    cfg = _sgd_config(tmp_path, "loss.method=cc_dist", "loss.alpha=0.5", "optim.accumulate=2")
    net = copy.deepcopy(model).train()
    opt = build_optimizer(cfg, net)
    torch.manual_seed(0)
    _accumulated_gradients(net, build_loss(cfg, teacher), opt, x, y, 0.025, "ramp", cfg)
    conv = net.features[1]
    assert isinstance(conv, torch.nn.Conv2d) and isinstance(net.features[2], torch.nn.BatchNorm2d)
    assert float(conv.weight.grad.abs().max()) > 1e-4
    assert float(conv.bias.grad.abs().max()) < 1e-5 * float(conv.weight.grad.abs().max()) + 1e-7

    # the replay with one micro-batch: the one-batch step's gradient
    cfg = _sgd_config(tmp_path, "loss.method=cc_dist", "loss.alpha=0.5")
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
        with stats.replaying(model, 4, 8):
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


def _digits_preset() -> dict:
    from ccdist_plugin.config import load_preset

    data = load_preset("digits").to_dict()
    data.pop("log", None)
    data["teacher"] = {"checkpoint": None}
    return data
