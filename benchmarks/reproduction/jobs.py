"""One run of the reproduction: the ``Job`` record, the TrainConfig of a run (the ``paper-cpu`` protocol's
and the issue-9 protocol's) and the student's initial network."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .plan import CIFAR_EPS, DIGITS_VAL, PAPER_CPU, VAL_SIZE


def _pgd(steps: int, step: float, eps_factor: float = 1.0):
    """A ``PGD`` object; the step is relative to ε (the field is ``step_size`` or ``step_size_rel``)."""
    from ccdist_plugin.attacks import PGD

    names = {f.name for f in dataclasses.fields(PGD)}
    key = "step_size_rel" if "step_size_rel" in names else "step_size"
    return PGD(steps=steps, eps_factor=eps_factor, **{key: step})


def cifar_overrides(kind: str, seed: int, out: Path, epochs: int, teacher_epochs: int) -> list[str]:
    """``--set`` overrides of the ``cifar10-jpeg-cpu`` presets for one run (the scaled-down protocol)."""
    common = [
        f"seed={seed}",
        "device=cpu",
        f"data.val_split={VAL_SIZE}",
        "model.name=cnn3",
        "model.width=128",
        "model.channels=[16, 32]",
        f"log.output_dir={out}",
        "log.progress=false",
        "log.tensorboard=false",
        "log.val_size=500",
        f"log.checkpoint_every={max(epochs, teacher_epochs)}",
    ]
    if kind == "teacher":
        return common + [
            "loss.method=pgd_at",
            f"schedule.epochs={teacher_epochs}",
            "optim.l1=1e-5",
        ]
    decay = [epochs - 2, epochs - 1]
    return common + [
        f"schedule.epochs={epochs}",
        "schedule.warmup_epochs=1",
        f"schedule.ramp_up_epochs={max(1, epochs // 2 - 1)}",
        f"optim.lr_decay_epochs=[{decay[0]}, {decay[1]}]",
    ]


@dataclasses.dataclass
class Job:
    """One training run followed by its evaluation."""

    name: str
    dataset: str  # cifar10-jpeg | digits
    kind: str  # teacher | cc_ibp | cc_dist
    seed: int
    alpha: float = 0.0
    beta_w: float | None = None  # β·w (None: 5)
    teacher: str | None = None  # checkpoint path
    evaluate_test: bool = True
    evaluate_val: bool = True
    epochs: int = 8
    teacher_epochs: int = 10
    teacher_steps: int = 5
    protocol: str = ""  # "" (the issue-9 runs) | "paper-cpu" (issue 17: PAPER_CPU)
    device: str = "cpu"


def paper_cpu_schedule(epochs: int) -> dict[str, Any]:
    """The paper's student schedule (160 epochs: 1 warm-up, an 80-epoch ramp, lr ×0.2 at 120 and 140)
    scaled to ``epochs``: ramp epochs/2, decays at 3/4 and 7/8 of the run."""
    if epochs < 2:
        raise ValueError(f"the paper-cpu schedule needs at least 2 epochs, got {epochs}")
    ramp = max(1, min(epochs - 1, round(epochs * 80 / 160)))
    decays = sorted({d for d in (round(epochs * 120 / 160), round(epochs * 140 / 160)) if 0 < d < epochs})
    return {"warmup_epochs": 1, "ramp_up_epochs": ramp, "lr_decay_epochs": decays}


def paper_cpu_config(job: Job, out: Path):
    """The TrainConfig of one ``paper-cpu`` run: the ``cifar10-jpeg-cpu(-teacher)`` presets (narrow CNN-7)
    or, for the smoke test, ``digits(-teacher)``; the loss and its attack are set in the config, so the
    run's ``config.yaml`` records exactly what trained."""
    from ccdist_plugin.config import load_config

    cifar = job.dataset == "cifar10-jpeg"
    preset = ("cifar10-jpeg-cpu" if cifar else "digits") + ("-teacher" if job.kind == "teacher" else "")
    common = [
        f"seed={job.seed}",
        f"device={job.device}",
        f"data.val_split={VAL_SIZE if cifar else DIGITS_VAL}",
        f"log.output_dir={out}",
        "log.progress=false",
        "log.tensorboard=false",
        f"log.val_size={500 if cifar else DIGITS_VAL}",
        "log.checkpoint_every=1",  # a killed run resumes from its last epoch
    ]
    if job.kind == "teacher":
        return load_config(
            preset,
            common
            + [
                "loss.method=pgd_at",
                f"schedule.epochs={job.teacher_epochs}",
                f"loss.attack.steps={job.teacher_steps}",
                "loss.attack.step_size=0.25",
                "loss.attack.eps_factor=1.0",
            ],
        )
    sched = paper_cpu_schedule(job.epochs)
    attack = PAPER_CPU["attack"]
    cfg = load_config(
        preset,
        common
        + [
            f"loss.method={job.kind}",
            f"loss.alpha={job.alpha}",
            f"schedule.epochs={job.epochs}",
            f"schedule.warmup_epochs={sched['warmup_epochs']}",
            f"schedule.ramp_up_epochs={sched['ramp_up_epochs']}",
            f"optim.lr_decay_epochs={sched['lr_decay_epochs']}",
            f"loss.attack.steps={attack['steps']}",
            f"loss.attack.step_size={attack['step']}",
            f"loss.attack.eps_factor={attack['eps_factor']}",
        ],
    )
    beta = None if job.kind == "cc_ibp" or job.beta_w is None else job.beta_w / cfg.model.width
    return cfg.replace(loss=dataclasses.replace(cfg.loss, beta=beta))


def build_student(cfg, spec):
    """The run's initial network, initialized from ``cfg.seed`` (``build_model`` seeds it): whatever ran
    before in the process (loading a teacher builds a network too) does not change it, so the same seed
    gives CC-IBP and CC-Dist the same initialization (paired runs)."""
    from ccdist_plugin.trainer import build_model

    return build_model(cfg, spec)


def build_unseeded(cfg, spec):
    """The issue-9 runs built their network from the process's random state (kept so that they reproduce
    as published; the paper-cpu protocol seeds it: :func:`build_student`)."""
    from ccdist_plugin.trainer import build_model

    return build_model(cfg, spec, seeded=False)


def issue9_config(job: Job, out: Path):
    """Config, data, ε and loss of one run of the issue-9 protocol (cnn3, 1-step attack)."""
    from ccdist_plugin.checkpoint import load_model
    from ccdist_plugin.config import load_config
    from ccdist_plugin.data import load_dataset
    from ccdist_plugin.losses import make_loss

    if job.dataset == "cifar10-jpeg":
        preset = "cifar10-jpeg-cpu-teacher" if job.kind == "teacher" else "cifar10-jpeg-cpu"
        cfg = load_config(preset, cifar_overrides(job.kind, job.seed, out, job.epochs, job.teacher_epochs))
        eps = CIFAR_EPS
        data = load_dataset("cifar10-jpeg", val_split=VAL_SIZE)
    else:
        preset = "digits-teacher" if job.kind == "teacher" else "digits"
        extra = [
            f"seed={job.seed}",
            f"log.output_dir={out}",
            "log.progress=false",
            "log.tensorboard=false",
            "data.val_split=200",
        ]
        if job.kind == "teacher":
            extra.append("loss.method=pgd_at")
        cfg = load_config(preset, extra)
        eps = cfg.eps
        data = load_dataset("digits", val_split=200)
    if job.kind == "teacher":
        steps = job.teacher_steps if job.dataset == "cifar10-jpeg" else 10
        loss = make_loss("pgd_at", attack=_pgd(steps, 2.5 / steps))
        cfg = cfg.replace(loss=dataclasses.replace(cfg.loss, method="pgd_at"))
    else:
        cfg = cfg.replace(
            loss=dataclasses.replace(
                cfg.loss,
                method=job.kind,
                alpha=job.alpha,
                beta=None if job.beta_w is None else job.beta_w / (cfg.model.width or 1),
            )
        )
        attack = _pgd(1, 10.0)  # the one-step training attack (docs/method.md)
        if job.kind == "cc_ibp":
            loss = make_loss("cc_ibp", alpha=job.alpha, attack=attack)
        else:
            teacher = load_model(job.teacher)
            w = teacher.feature_dim
            beta = None if job.beta_w is None else job.beta_w / w
            loss = make_loss("cc_dist", teacher=teacher, alpha=job.alpha, beta=beta, attack=attack)
    return cfg, data, eps, loss
