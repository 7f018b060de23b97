"""Trainer: outputs, exact resume, atomic checkpoints, NaN handling, teachers, one short run per method."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import fast_config, tiny_cnn3

import ccdist_plugin.checkpoint as ckpt_module
from ccdist_plugin.bounds import margin_lower_bound
from ccdist_plugin.checkpoint import load_checkpoint, load_model, save_checkpoint
from ccdist_plugin.config import TrainConfig
from ccdist_plugin.losses import loss_class
from ccdist_plugin.models import cnn3
from ccdist_plugin.trainer import NonFiniteLossError, Trainer, build_model, train_teacher

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits(digits_data):
    return digits_data


def _cfg(tmp_path, *overrides: str) -> TrainConfig:
    return fast_config(tmp_path, *overrides)


class StubIBPLoss:
    """A user-defined loss: CE of the negated IBP margin bounds, on a randomly perturbed input (so that
    the run consumes the global RNG, as attacks with random starts do)."""

    needs_teacher = False

    def __init__(self, fail_at: int | None = None, exc: type[BaseException] = KeyboardInterrupt, nan_at=None):
        self.calls, self.fail_at, self.exc, self.nan_at = 0, fail_at, exc, nan_at

    def __call__(self, model, x, y, eps):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise self.exc("interrupted")
        x_noisy = (x + 0.01 * torch.rand_like(x)).clamp(0, 1)
        z_lb = margin_lower_bound(model, x_noisy, y, eps)
        loss = F.cross_entropy(-z_lb, y)
        if self.nan_at is not None and self.calls == self.nan_at:
            loss = loss * float("nan")
        return SimpleNamespace(loss=loss, terms={"ibp_ce": loss.detach()}, stats=None)


def _model(spec, seed=0):
    return tiny_cnn3(spec, seed)


def test_fit_writes_run_outputs(digits, tmp_path):
    cfg = _cfg(tmp_path, "log.plot=true")
    model = build_model(cfg, digits.spec)
    result = Trainer(model, cfg, loss=StubIBPLoss()).fit(digits.train, digits.test)
    run = tmp_path / "run"
    for name in ("config.yaml", "checkpoint.pt", "metrics.csv", "metrics.jsonl", "curves.png"):
        assert (run / name).is_file(), name
    assert TrainConfig.from_yaml(run / "config.yaml") == cfg
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and [r["phase"] for r in rows] == [
        "warmup",
        "ramp",
        "constant",
    ]
    assert rows[0]["eps"] == 0.0 and rows[1]["eps"] == pytest.approx(0.05) and rows[2]["eps"] == 0.05
    assert rows[2]["lr"] == pytest.approx(2e-4)  # decayed x0.2 at epoch index 2
    assert "train_clean_ce" in rows[0] and "train_ibp_ce" in rows[1]
    assert (
        "train_shi_tightness" in rows[1] and "train_shi_tightness" not in rows[2]
    )  # regularizer only in ramp
    for r in rows:
        assert {"val_clean_acc", "val_ibp_cert_acc", "time_s", "lr", "train_loss"} <= set(r)
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "eps", "lr", "val_ibp_cert_acc"} <= set(header)
    loaded = load_model(run / "checkpoint.pt")
    x, _ = digits.test.tensors()
    assert torch.equal(loaded(x), result.model.eval()(x))
    payload = load_checkpoint(run / "checkpoint.pt")
    assert payload["epoch"] == 3 and payload["dataset_fingerprint"] == digits.train.fingerprint()
    assert {"torch", "numpy", "python"} <= set(payload["rng"]) and payload["optimizer_state"]["state"]


def test_fit_accepts_plain_tensors_and_datasets(digits, tmp_path):
    x, y = digits.train.tensors()
    cfg = _cfg(tmp_path, "schedule.epochs=2")
    r1 = Trainer(_model(digits.spec), cfg, loss=StubIBPLoss()).fit((x, y), digits.test.tensors())
    r2 = Trainer(_model(digits.spec), cfg, loss=StubIBPLoss()).fit(torch.utils.data.TensorDataset(x, y))
    assert len(r1.history) == len(r2.history) == 2
    assert "val_ibp_cert_acc" in r1.history[-1] and "val_ibp_cert_acc" not in r2.history[-1]


class _Interrupting:
    """Wraps a loss and raises KeyboardInterrupt on its ``fail_at``-th call."""

    def __init__(self, loss, fail_at: int | None = None):
        self.loss, self.fail_at, self.calls = loss, fail_at, 0
        self.needs_teacher = False

    def __call__(self, model, x, y, eps):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt("interrupted")
        return self.loss(model, x, y, eps)


@pytest.mark.parametrize("kind", ["stub", "cc_ibp"])
def test_resume_is_bit_identical(kind, digits, tmp_path):
    def make_loss(cfg):
        if kind == "stub":
            return StubIBPLoss()
        from ccdist_plugin.trainer import build_loss

        return build_loss(cfg)  # CC-IBP with its 1-step attack from a random start

    cfg_a = _cfg(tmp_path / "a", "loss.method=cc_ibp")
    full = Trainer(_model(digits.spec), cfg_a, loss=make_loss(cfg_a)).fit(digits.train, digits.test)

    cfg_b = cfg_a.override([f"log.output_dir={tmp_path / 'b' / 'run'}"])
    batches = -(-len(digits.train) // 64)
    # interrupted in the middle of epoch 3 (the loss is first called in epoch 2)
    with pytest.raises(KeyboardInterrupt):
        Trainer(_model(digits.spec), cfg_b, loss=_Interrupting(make_loss(cfg_b), batches + 2)).fit(
            digits.train, digits.test
        )
    assert load_checkpoint(tmp_path / "b" / "run" / "checkpoint.pt")["epoch"] == 2
    torch.manual_seed(123)  # the resumed process starts from another RNG state and another init
    resumed = Trainer(_model(digits.spec, seed=7), cfg_b, loss=make_loss(cfg_b)).fit(
        digits.train, digits.test, resume=True
    )
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert resumed.history[-1]["train_loss"] == full.history[-1]["train_loss"]


def test_channels_last_gives_the_same_step_and_trains(digits, tmp_path):
    """``channels_last`` changes the memory layout only: one CC-IBP step gives the same loss and gradients
    up to float rounding; a whole run trains with channels-last weights and its checkpoint loads as usual."""
    from ccdist_plugin.checkpoint import load_model
    from ccdist_plugin.trainer import build_loss

    cfg = _cfg(tmp_path / "step", "loss.method=cc_ibp")
    x, y = digits.train.uint8_batch(np.arange(64))
    x, y = torch.from_numpy(x).float() / digits.train.scale, torch.from_numpy(y)
    steps = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        model = _model(digits.spec).train().to(memory_format=layout)
        torch.manual_seed(0)  # the same random start of the attack
        out = build_loss(cfg)(model, x.contiguous(memory_format=layout), y, cfg.eps)
        out.loss.backward()
        steps[layout] = (out.loss.detach(), [p.grad for p in model.parameters()])
    (loss_a, grads_a), (loss_b, grads_b) = steps.values()
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    scale = max(float(g.abs().max()) for g in grads_a)  # conv biases before BatchNorm: ~0 up to rounding
    for ga, gb in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(gb, ga, rtol=1e-3, atol=1e-4 * scale)

    fits = {}
    for layout in (False, True):
        cfg = _cfg(tmp_path / str(layout), "loss.method=cc_ibp", f"channels_last={layout}")
        torch.manual_seed(0)
        fits[layout] = Trainer(_model(digits.spec), cfg, loss=build_loss(cfg)).fit(digits.train, digits.test)
    fit = fits[True]
    conv = next(m for m in fit.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    # rounding differences grow over a run (Adam), so the runs agree in outcome, not bit for bit
    acc = [f.history[-1]["val_clean_acc"] for f in fits.values()]
    assert abs(acc[1] - acc[0]) <= 0.1, acc
    assert all(math.isfinite(r["train_loss"]) for r in fit.history)
    reloaded = load_model(tmp_path / "True" / "run" / "checkpoint.pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), fit.model.eval()(x), rtol=1e-5, atol=1e-5)


def test_resume_refuses_another_config(digits, tmp_path):
    cfg = _cfg(tmp_path, "schedule.epochs=2")
    Trainer(_model(digits.spec), cfg, loss=StubIBPLoss()).fit(digits.train)
    other = cfg.override(["optim.l1=0.001", "log.val_size=5"])  # log.* may differ, l1 may not
    with pytest.raises(ValueError, match=r"different config.*optim\.l1: 1e-05 != 0\.001"):
        Trainer(_model(digits.spec), other, loss=StubIBPLoss()).fit(digits.train, resume=True)
    with pytest.raises(ValueError, match="different dataset"):
        Trainer(_model(digits.spec), cfg, loss=StubIBPLoss()).fit(
            digits.train.subset(np.arange(128)), resume=True
        )


def test_interrupted_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1, "value": torch.arange(3)})

    def broken_save(obj, fh, *args, **kwargs):
        fh.write(b"partial garbage")
        raise OSError("disk full (injected)")

    monkeypatch.setattr(ckpt_module.torch, "save", broken_save)
    with pytest.raises(OSError, match="injected"):
        save_checkpoint(path, {"epoch": 2, "value": torch.arange(5)})
    monkeypatch.undo()
    payload = load_checkpoint(path)
    assert payload["epoch"] == 1 and torch.equal(payload["value"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left behind
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        load_checkpoint(path)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(digits, tmp_path):
    cfg = _cfg(tmp_path)
    loss = StubIBPLoss(nan_at=2)  # epoch 2, batch 2
    with pytest.raises(NonFiniteLossError, match=r"epoch 2/3, batch 2/4"):
        Trainer(_model(digits.spec), cfg, loss=loss).fit(digits.train)
    payload = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert payload["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in payload["model_state"].values() if v.is_floating_point())


def test_teacher_is_checked_loaded_and_frozen(digits, tmp_path):
    """One path: Trainer(teacher=...) or teacher.checkpoint -> the config's loss, which freezes the
    teacher and checks it against the student when the trainer is built."""
    cfg = _cfg(tmp_path, "schedule.epochs=1", "schedule.ramp_up_epochs=0")  # loss.method: cc_dist
    student = _model(digits.spec)
    wide = cnn3(1, 8, 10, width=32, channels=(4, 8))
    with pytest.raises(ValueError, match="feature width: teacher 32 vs student 16"):
        Trainer(student, cfg, teacher=wide)
    other_norm = cnn3(1, 8, 10, width=16, channels=(4, 8), mean=[0.3], std=[0.2])
    with pytest.raises(ValueError, match="normalization"):
        Trainer(student, cfg, teacher=other_norm)
    Trainer(_model(digits.spec), cfg, loss=StubIBPLoss()).fit(digits.train)
    teacher_path = tmp_path / "run" / "checkpoint.pt"
    for trainer in (
        Trainer(student, cfg.override([f"log.output_dir={tmp_path / 's'}"]), teacher=teacher_path),
        Trainer(student, cfg.override([f"teacher.checkpoint={teacher_path}", f"log.output_dir={tmp_path}"])),
    ):
        assert trainer.teacher is trainer.loss.teacher and not trainer.teacher.training
        assert all(not p.requires_grad for p in trainer.teacher.parameters())
    with pytest.raises(ValueError, match="does not exist"):
        Trainer(student, cfg, teacher=tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="carries its own teacher"):
        Trainer(student, cfg, teacher=teacher_path, loss=StubIBPLoss())


def test_train_teacher_needs_teacher_config(digits, tmp_path):
    with pytest.raises(ValueError, match="role: teacher"):
        train_teacher(_model(digits.spec), _cfg(tmp_path), digits.train)


# ------------------------------------------------------------------------------- registered losses


METHODS = [
    "cc_dist",
    "cc_ibp",
    "ibp",
    "pgd_at",
    "mtl_ibp",
    "exp_ibp",
    "sabr",
    "cc_dist0",
    "cc_dist1",
    "logit_dist",
]
OPTIONS = {"sabr": ["loss.options={lam: 0.5}"]}


@pytest.fixture(scope="module")
def digits_teacher(digits, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("teacher")
    cfg = _cfg(
        tmp,
        "role=teacher",
        "loss.method=pgd_at",
        "loss.attack.steps=3",
        "loss.attack.step_size=0.5",
        "schedule.warmup_epochs=0",
        "schedule.ramp_up_epochs=0",
        "schedule.epochs=2",
        "optim.optimizer=sgd",
        "optim.lr=0.05",
        "optim.lr_schedule=cyclic",
        "optim.shi_lambda=0",
    )
    return train_teacher(_model(digits.spec), cfg, digits.train).checkpoint


@pytest.mark.parametrize("method", METHODS)
def test_short_run_per_method_reduces_loss_and_certifies(method, digits, digits_teacher, tmp_path):
    cfg = _cfg(
        tmp_path,
        f"loss.method={method}",
        "loss.alpha=0.5",
        "eps=0.02",
        "schedule.epochs=4",
        "schedule.warmup_epochs=0",
        "schedule.ramp_up_epochs=0",
        "optim.lr=3e-3",
        "optim.lr_decay_epochs=[]",
        "log.val_size=64",
        *OPTIONS.get(method, []),
    )
    teacher = digits_teacher if loss_class(method).teacher_use == "required" else None
    result = Trainer(_model(digits.spec), cfg, teacher=teacher).fit(digits.train, digits.test)
    losses_per_epoch = [r["train_loss"] for r in result.history]
    assert losses_per_epoch[-1] < losses_per_epoch[0], losses_per_epoch
    if method != "pgd_at":
        assert result.history[-1]["val_ibp_cert_acc"] > 0.0
    else:
        assert result.history[-1]["val_clean_acc"] > 0.3


def test_loss_construction_errors(digits, tmp_path):
    with pytest.raises(ValueError, match="distils from a teacher"):
        Trainer(_model(digits.spec), _cfg(tmp_path, "loss.method=cc_dist"))
    with pytest.raises(ValueError, match="needs lam"):
        Trainer(_model(digits.spec), _cfg(tmp_path, "loss.method=sabr"))
    with pytest.raises(ValueError, match="did you mean 'cc_ibp'"):
        Trainer(_model(digits.spec), _cfg(tmp_path, "loss.method=ccibp"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        # values a loss does not take were silently dropped before
        (
            ["loss.method=sabr", "loss.options={lam: 0.5}", "loss.alpha=0.3"],
            r"loss.alpha=0.3 is not used by loss 'sabr'",
        ),
        (["loss.method=ibp", "loss.alpha=0.3"], r"loss.alpha=0.3 is not used by loss 'ibp'"),
        (["loss.method=ibp", "loss.attack.steps=5"], r"loss.attack=\{...\} is not used by loss 'ibp'"),
        (["loss.method=cc_ibp", "loss.beta=0.1"], r"loss.beta=0.1 weighs the distillation term"),
        (["loss.method=cc_ibp", "loss.options={lam: 0.5}"], r"loss.options \['lam'\] are not taken"),
    ],
)
def test_a_config_value_the_loss_does_not_take_is_an_error(digits, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        Trainer(_model(digits.spec), _cfg(tmp_path, *overrides))


def test_default_and_implied_values_are_accepted(digits, tmp_path):
    """The rule compares values (a saved config.yaml holds every field): a default, or the value the
    loss implies (α = 1 for IBP, α = 0 for PGD), passes; so do every packaged preset's values."""
    from ccdist_plugin.config import list_presets, load_preset

    for overrides in (["loss.method=ibp", "loss.alpha=1.0"], ["loss.method=pgd_at", "loss.alpha=0"]):
        Trainer(_model(digits.spec), _cfg(tmp_path, *overrides))
    teacher = _model(digits.spec)
    for name in list_presets():
        cfg = load_preset(name)
        cls = loss_class(cfg.loss.method)
        cls.config_arguments(cfg.loss, with_teacher=cls.teacher_use != "none")  # raises on a stray value
    with pytest.raises(ValueError, match="takes no teacher"):
        Trainer(_model(digits.spec), _cfg(tmp_path, "loss.method=ibp"), teacher=teacher)


def test_training_step_is_one_documented_function(digits, tmp_path):
    """``training_step`` alone: the step moves the weights and returns the logged terms as floats; a
    NaN loss raises before the update."""
    from ccdist_plugin.trainer import build_loss, build_optimizer, training_step

    cfg = _cfg(tmp_path, "loss.method=cc_ibp")
    model = _model(digits.spec)
    x, y = (torch.as_tensor(t) for t in digits.train.tensors())
    x, y = x[:32], y[:32]
    optimizer = build_optimizer(cfg, model)
    before = [p.detach().clone() for p in model.parameters()]
    terms, logits = training_step(model, build_loss(cfg), optimizer, x, y, 0.02, 1e-3, "ramp", cfg)
    assert logits is None and {"loss", "cc_ibp", "shi_tightness", "l1_norm"} <= set(terms)
    assert all(isinstance(v, float) for v in terms.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    frozen = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteLossError) as err:
        training_step(model, StubIBPLoss(nan_at=1), optimizer, x, y, 0.02, 1e-3, "constant", cfg)
    assert math.isnan(err.value.terms["loss"])
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.parameters(), strict=True))


def test_fit_checks_its_data_once(digits, tmp_path):
    """Trainer.fit is a public entry point: data in 0-255 pixel units, or labels outside the classes,
    are one clear error before any step (checked on the validation set and the first batch)."""
    x, y = digits.train.tensors()
    cfg = _cfg(tmp_path, "schedule.epochs=1", "schedule.ramp_up_epochs=0")
    with pytest.raises(ValueError, match="pixel space"):
        Trainer(_model(digits.spec), cfg, loss=StubIBPLoss()).fit((x * 255, y))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        Trainer(_model(digits.spec), cfg, loss=StubIBPLoss()).fit((x, y), (x, y + 10))


def test_the_api_and_the_cli_train_the_same_model_from_one_config(tmp_path):
    """``build_model`` initializes from ``config.seed`` (the CLI builds through it too): the same config
    gives identical weights through ``Trainer`` and ``ccdist train``, whatever the caller's random state."""
    from click.testing import CliRunner

    from ccdist_plugin.cli import main
    from ccdist_plugin.config import load_config
    from ccdist_plugin.trainer import load_data

    config_file = tmp_path / "config.yaml"
    short = ["schedule.epochs=2", "optim.lr_decay_epochs=[]"]
    _cfg(tmp_path, "seed=3", "loss.method=cc_ibp", *short).to_yaml(config_file)
    cli = CliRunner().invoke(
        main, ["train", "--config", str(config_file), "--output-dir", str(tmp_path / "cli"), "--quiet"]
    )
    assert cli.exit_code == 0, cli.output

    cfg = load_config(str(config_file), [f"log.output_dir={tmp_path / 'api'}"])
    data = load_data(cfg)  # as examples/quickstart.py does
    torch.manual_seed(12345)  # the caller's random state neither matters nor changes
    expected_draw = torch.rand(4)
    torch.manual_seed(12345)
    model = build_model(cfg, data.spec)
    assert torch.equal(torch.rand(4), expected_draw)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    other_seed = build_model(cfg.override(["seed=4"]), data.spec).state_dict()
    assert any(not torch.equal(initial[k], other_seed[k]) for k in initial)  # the seed is what decides
    Trainer(model, cfg).fit(data.train, data.test)

    cli_state = load_checkpoint(tmp_path / "cli" / "checkpoint.pt")["model_state"]
    api_state = load_checkpoint(tmp_path / "api" / "checkpoint.pt")["model_state"]
    assert cli_state.keys() == api_state.keys()
    for key in cli_state:
        assert torch.equal(cli_state[key], api_state[key]), key
    assert any(not torch.equal(initial[k], api_state[k]) for k in initial)  # it trained
