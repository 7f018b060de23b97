"""Config: YAML round trip, strict keys with suggestions, overrides, presets against SPEC.md's table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ccdist_plugin.config import (
    TrainConfig,
    config_diff,
    list_presets,
    load_config,
    load_preset,
)
from ccdist_plugin.models import CertifiedNet

SPEC_MD = Path(__file__).resolve().parents[1] / ".." / "shared" / "SPEC.md"

# SPEC.md "Student training" table, transcribed (the test below re-reads SPEC.md when it is present):
# preset: (eps, epochs, ramp-up, lr decays, alpha CC-Dist, alpha CC-IBP, l1, teacher epochs, teacher l1)
PAPER_TABLE = {
    "cifar10-2": (2 / 255, 160, 80, (120, 140), 1e-2, 1e-2, 3e-6, 30, 1e-5),
    "cifar10-8": (8 / 255, 260, 80, (180, 220), 0.5, 0.5, 0.0, 30, 5e-6),
    "tinyimagenet-1": (1 / 255, 160, 80, (120, 140), 5e-3, 3e-3, 5e-5, 100, 5e-5),
    "imagenet64-1": (1 / 255, 80, 20, (60, 70), 5e-3, 5e-3, 1e-5, 30, 5e-6),
}
SPEC_ROW_NAMES = {
    ("CIFAR-10", "2/255"): "cifar10-2",
    ("CIFAR-10", "8/255"): "cifar10-8",
    ("TinyImageNet", "1/255"): "tinyimagenet-1",
    ("ImageNet64", "1/255"): "imagenet64-1",
}
SHI_LAMBDA = {"cifar10-2": 0.5, "cifar10-8": 0.5, "tinyimagenet-1": 0.2, "imagenet64-1": 0.2}
DATASET = {
    "cifar10-2": "cifar10",
    "cifar10-8": "cifar10",
    "tinyimagenet-1": "tinyimagenet",
    "imagenet64-1": "imagenet64",
}
# (in_channels, input_size, classes, width) -> parameter count of the paper's CNN-7
CNN7_PARAMS = {
    "cifar10": ((3, 32, 10, 512), 17_192_650),
    "tinyimagenet": ((3, 64, 200, 512), 17_290_120),
    "imagenet64": ((3, 64, 1000, 1024), 34_991_272),  # width 1024 (paper D.2.3), counted from models.cnn7
}


def _num(text: str) -> float:
    text = text.strip()
    if "/" in text:
        a, b = text.split("/")
        return float(a) / float(b)
    return float(text)


def test_round_trip_yaml(tmp_path):
    cfg = TrainConfig().override(
        ["loss.alpha=0.25", "eps=2/255", "optim.lr_decay_epochs=[3, 5]", "model.width=64"]
    )
    path = tmp_path / "c.yaml"
    cfg.to_yaml(path)
    again = TrainConfig.from_yaml(path)
    assert again == cfg
    assert again.eps == pytest.approx(2 / 255)
    assert again.optim.lr_decay_epochs == (3, 5)
    assert config_diff(cfg, again) == []


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_round_trips(name, tmp_path):
    cfg = load_preset(name)
    cfg.to_yaml(tmp_path / "p.yaml")
    assert load_config(tmp_path / "p.yaml") == cfg


@pytest.mark.parametrize(
    "text, key, suggestion",
    [
        ("optim:\n  lr_decay_epoch: [1]\n", "optim.lr_decay_epoch", "optim.lr_decay_epochs"),
        ("los:\n  alpha: 0.5\n", "los", "loss"),
        ("loss:\n  attack:\n    step: 3\n", "loss.attack.step", "loss.attack.steps"),
        ("epsilon: 0.1\n", "epsilon", "eps"),
    ],
)
def test_unknown_key_names_nearest(text, key, suggestion):
    with pytest.raises(ValueError) as err:
        TrainConfig.from_yaml(text)
    assert repr(key) in str(err.value)
    assert repr(suggestion) in str(err.value)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("loss.alpha=high", "loss.alpha"),
        ("schedule.epochs=2.5", "schedule.epochs"),
        ("log.progress=maybe", "log.progress"),
        ("loss.alpha=1.5", "alpha"),
        ("eps=8", "pixel space"),
        ("optim.optimizer=rmsprop", "optim.optimizer"),
        ("schedule.ramp_up_epochs=50", "exceeds epochs"),
        ("optim.lr_decay_epochs=[5, 3]", "increasing"),
        ("loss=3", "section"),
        ("noequals", "key=value"),
    ],
)
def test_bad_values_are_clear_errors(override, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        TrainConfig().override([override])


def test_override_typos_suggest():
    with pytest.raises(ValueError, match="did you mean 'optim.shi_lambda'"):
        TrainConfig().override(["optim.shi_lamda=0.1"])


def test_unknown_preset_suggests():
    with pytest.raises(ValueError, match="did you mean 'cifar10-2'"):
        load_preset("cifar10_2")


def test_config_diff_names_keys():
    a, b = TrainConfig(), TrainConfig().override(["loss.alpha=0.1", "log.val_size=3"])
    diff = config_diff(a, b, ignore=("log",))
    assert diff == ["loss.alpha: 0.5 != 0.1"]


def test_presets_listed():
    names = set(list_presets())
    for base in PAPER_TABLE:
        assert {base, f"{base}-teacher", f"{base}-ccibp"} <= names
    assert {"digits", "digits-teacher", "cifar10-jpeg-cpu", "cifar10-jpeg-cpu-teacher"} <= names


@pytest.mark.parametrize("name", sorted(PAPER_TABLE))
def test_paper_presets_match_spec_table(name):
    eps, epochs, ramp, decays, a_dist, a_ibp, l1, t_epochs, t_l1 = PAPER_TABLE[name]
    student, ccibp, teacher = load_preset(name), load_preset(f"{name}-ccibp"), load_preset(f"{name}-teacher")
    for cfg in (student, ccibp):
        assert cfg.role == "student" and cfg.data.name == DATASET[name]
        assert cfg.eps == pytest.approx(eps, rel=1e-12)
        assert cfg.schedule.epochs == epochs and cfg.schedule.ramp_up_epochs == ramp
        assert cfg.schedule.warmup_epochs == 1
        assert (cfg.schedule.eps_mid, cfg.schedule.eps_beta) == (0.25, 4.0)
        assert cfg.optim.lr_decay_epochs == decays and cfg.optim.lr_decay_factor == 0.2
        assert (cfg.optim.optimizer, cfg.optim.lr, cfg.optim.lr_schedule) == ("adam", 5e-4, "step")
        assert cfg.optim.batch_size == 128 and cfg.optim.grad_clip == 10.0
        assert cfg.optim.l1 == l1
        assert cfg.optim.shi_lambda == SHI_LAMBDA[name] and cfg.optim.shi_tau == 0.5
        assert cfg.model.name == "cnn7" and cfg.model.init == "shi"
        attack = cfg.loss.attack
        if name == "cifar10-2":  # published commands: 8 steps of 0.25 eps' on eps' = 2.1 eps
            assert (attack.steps, attack.step_size, attack.eps_factor) == (8, 0.25, 2.1)
        else:  # one step of 10 eps
            assert (attack.steps, attack.step_size, attack.eps_factor) == (1, 10.0, 1.0)
        assert attack.random_start
    assert (student.loss.method, student.loss.alpha, student.loss.beta) == ("cc_dist", a_dist, None)
    assert (ccibp.loss.method, ccibp.loss.alpha) == ("cc_ibp", a_ibp)
    assert student.teacher.preset == f"{name}-teacher"
    # teacher (SPEC.md "Teacher")
    assert teacher.role == "teacher" and teacher.loss.method == "pgd_at"
    assert teacher.eps == pytest.approx(eps, rel=1e-12)
    assert teacher.schedule.epochs == t_epochs and teacher.optim.l1 == t_l1
    assert (teacher.loss.attack.steps, teacher.loss.attack.step_size) == (10, 0.25)
    assert teacher.loss.attack.random_start and teacher.loss.attack.eps_factor == 1.0
    assert (teacher.optim.optimizer, teacher.optim.momentum, teacher.optim.lr) == ("sgd", 0.9, 0.2)
    assert teacher.optim.lr_schedule == "cyclic" and teacher.optim.grad_clip == 10.0
    assert teacher.optim.batch_size == 128 and teacher.model == student.model


@pytest.mark.skipif(not SPEC_MD.is_file(), reason="../shared/SPEC.md not present beside the repository")
def test_transcription_matches_spec_md():
    rows = [line for line in SPEC_MD.read_text().splitlines() if line.startswith("| ") and "/255" in line]
    seen = set()
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if (cells[0], cells[1]) not in SPEC_ROW_NAMES:
            continue
        name = SPEC_ROW_NAMES[(cells[0], cells[1])]
        eps, epochs, ramp, decays, a_dist, a_ibp, l1, t_epochs, t_l1 = PAPER_TABLE[name]
        assert _num(cells[1]) == pytest.approx(eps)
        assert (int(cells[2]), int(cells[3])) == (epochs, ramp)
        assert tuple(int(d) for d in cells[4].split(",")) == decays
        assert (_num(cells[5]), _num(cells[6]), _num(cells[7])) == (a_dist, a_ibp, l1)
        assert (int(cells[8]), _num(cells[9])) == (t_epochs, t_l1)
        seen.add(name)
    assert seen == set(PAPER_TABLE)


@pytest.mark.parametrize("name", sorted(PAPER_TABLE))
def test_presets_build_the_papers_cnn7(name):
    from ccdist_plugin.data import dataset_spec
    from ccdist_plugin.trainer import build_model

    cfg = load_preset(name)
    spec = dataset_spec(cfg.data.name)
    (c, size, classes, width), count = CNN7_PARAMS[cfg.data.name]
    model = build_model(cfg, spec)
    assert isinstance(model, CertifiedNet)
    assert (
        model.input_shape == (c, size, size) and model.num_classes == classes and model.feature_dim == width
    )
    assert sum(p.numel() for p in model.parameters()) == count
    assert model.normalize.mean.flatten().tolist() == pytest.approx(list(spec.mean))
    convs = [m for m in model.features if m.__class__.__name__ == "Conv2d"]
    assert [m.out_channels for m in convs] == [64, 64, 128, 128, 128]
    assert [m.stride[0] for m in convs] == [1, 1, 2, 1, 2 if size == 64 else 1]
