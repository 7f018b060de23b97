"""The training loop: PGD teachers and certified students (CC-Dist, CC-IBP, ...), one loop for all.

The protocol (docs/method.md "Teacher" and "Student training") is configuration (:class:`TrainConfig`):

- students: Shi et al. initialization (the model's constructor), ``warmup_epochs`` of clean
  cross-entropy (clean batch statistics), then the loss at the smoothed per-batch ε_t of
  :class:`~ccdist_plugin.schedules.EpsSchedule`; during the ramp the Shi et al. regularizer with
  weight λ(1 − ε_t/ε) (bounds at ε = 1e-6 on ε_t = 0 batches); ℓ1 on Conv/Linear weights; Adam with
  step decays; gradient-norm clipping;
- teachers: the ``pgd_at`` loss (PGD-10, step 0.25ε, random start), SGD with momentum and a
  cyclic learning rate, no warm-up and no ramp.

Any loss object ``loss(model, x, y, eps) -> LossOutput(loss, terms, stats)`` works, so a user can pass
their own; the config's ``loss.method`` otherwise picks a registered one, built from ``config.loss``
by the loss class itself (:meth:`~ccdist_plugin.losses.RobustLoss.from_config`). What one training
step does is :func:`~ccdist_plugin.step.training_step` (module ``step``). Training data may be a
``ccdist_plugin.data`` dataset (fast deterministic batches), a ``BatchIterator``, any torch
``Dataset`` or ``DataLoader`` yielding ``(x, y)`` with x in pixel space [0, 1], or a tuple of tensors.

Outputs in ``config.log.output_dir``: ``config.yaml`` (resolved), ``checkpoint.pt`` (atomic; every
``checkpoint_every`` epochs and at the end), ``metrics.csv``/``metrics.jsonl`` (one row per epoch),
``tensorboard/`` (when TensorBoard is installed) and ``curves.png``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ccdist_plugin import distributed
from ccdist_plugin.batching import batch_slices
from ccdist_plugin.checkpoint import (
    capture_rng_state,
    check_finite_state,
    check_resumable,
    load_checkpoint,
    load_model,
    restore_rng_state,
    save_checkpoint,
    state_sha256,
)
from ccdist_plugin.config import TrainConfig
from ccdist_plugin.losses import loss_class
from ccdist_plugin.models import CertifiedNet, create_model
from ccdist_plugin.progress import progress_bar
from ccdist_plugin.schedules import EpsSchedule, LRSchedule
from ccdist_plugin.step import (  # step_objective, REG_EPS_FLOOR: importable here as before step.py
    REG_EPS_FLOOR,  # noqa: F401
    NonFiniteLossError,
    step_objective,  # noqa: F401
    training_step,
)
from ccdist_plugin.train_data import EpochBatches, validation_tensors
from ccdist_plugin.training_logs import format_row, plot_curves, write_metrics
from ccdist_plugin.validate import check_batch

__all__ = [
    "Trainer",
    "FitResult",
    "NonFiniteLossError",
    "train_teacher",
    "build_model",
    "load_data",
    "resolve_device",
    "load_teacher",
    "build_loss",
    "training_step",
    "build_optimizer",
]

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"


@dataclass
class FitResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        model: the trained network (eval mode).
        history: one dict of metrics per epoch.
        run_dir: the output directory.
        checkpoint: path of the final checkpoint.
    """

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    run_dir: Path | None = None
    checkpoint: Path | None = None


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when available else cpu; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_data(config: TrainConfig):
    """``ccdist_plugin.data.load_dataset`` for ``config.data`` (returns its ``Datasets``)."""
    from ccdist_plugin.data import load_dataset

    return load_dataset(config.data.name, **config.data.load_kwargs())


def build_model(config: TrainConfig, spec, seeded: bool = True) -> CertifiedNet:
    """The network of ``config.model`` for a dataset spec (input shape, classes, normalization),
    initialized from ``config.seed``.

    The ``ccdist`` commands build their networks here too, so the same config gives the same initial
    weights through the Python API and the command line, whatever ran before in the process. The
    caller's random state is left as it was. ``seeded=False`` draws the initialization from the
    process's random state instead (and advances it).
    """
    c, h, _ = spec.input_shape

    def build() -> CertifiedNet:
        return create_model(
            config.model.name,
            in_channels=c,
            input_size=h,
            num_classes=spec.num_classes,
            mean=list(spec.mean),
            std=list(spec.std),
            **config.model.constructor_kwargs(),
        )

    if not seeded:
        return build()
    with torch.random.fork_rng(devices=[]):  # the network is built on the CPU
        torch.manual_seed(config.seed)
        return build()


def load_teacher(
    teacher: nn.Module | str | Path, device: torch.device, channels_last: bool = False
) -> CertifiedNet:
    """The teacher network (loaded when a checkpoint path) on ``device`` (channels-last when asked).

    Freezing it (eval mode, no gradients) and checking it against the student is the loss's part
    (:class:`~ccdist_plugin.losses.RobustLoss`), done once there.
    """
    if isinstance(teacher, (str, Path)):
        teacher = load_model(teacher, map_location="cpu")  # refuses non-finite weights
    check_finite_state(teacher, "teacher")
    teacher = teacher.to(device)
    return teacher.to(memory_format=torch.channels_last) if channels_last else teacher


def build_loss(config: TrainConfig, teacher: nn.Module | None = None):
    """The loss ``config.loss.method`` names, built from ``config.loss`` by the loss class
    (:meth:`~ccdist_plugin.losses.RobustLoss.from_config`): a config value the loss does not take,
    a teacher it cannot use or a missing one it needs is a ``ValueError`` naming it. Losses with a
    schedule on the ε ramp (CROWN-IBP, IBP-R) get the run's ε as their target."""
    return loss_class(config.loss.method).from_config(config.loss, teacher, eps_target=config.eps)


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Adam or SGD with momentum (``config.optim``) over the trainable parameters."""
    opt = config.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if opt.optimizer == "adam":
        return torch.optim.Adam(params, lr=opt.lr, weight_decay=opt.weight_decay)
    return torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)


def _schedules(config: TrainConfig, batches_per_epoch: int) -> tuple[EpsSchedule, LRSchedule]:
    sched, opt, nb = config.schedule, config.optim, batches_per_epoch
    eps = EpsSchedule(
        config.eps, sched.warmup_epochs, sched.ramp_up_epochs, nb, sched.eps_mid, sched.eps_beta
    )
    lr = LRSchedule(
        opt.lr_schedule,
        opt.lr,
        sched.epochs,
        nb,
        tuple(opt.lr_decay_epochs),
        opt.lr_decay_factor,
    )
    return eps, lr


def _seed_everything(seed: int) -> None:
    import random

    torch.manual_seed(seed + distributed.rank())  # under torchrun: distinct attack noise per rank
    np.random.seed(seed % 2**32)
    random.seed(seed)


# ------------------------------------------------------------------------------------------ trainer


class Trainer:
    """Train ``model`` with ``config`` (docs/method.md protocol); see the module docstring.

    Args:
        model: a :class:`CertifiedNet` (already Shi-initialized by its constructor).
        config: the run's :class:`TrainConfig`.
        teacher: a teacher network or checkpoint path for the config's loss (default:
            ``config.teacher.checkpoint``). The loss freezes it and checks it against the student.
        loss: any callable ``loss(model, x, y, eps) -> LossOutput`` (default: the loss
            ``config.loss`` describes). A loss object carries its own teacher, so ``teacher`` must
            then be None.

    Example (a CC-Dist student needs a teacher: a network of the same feature width, or a checkpoint
    path; a freshly initialized one stands in here for the PGD teacher of :func:`train_teacher`)::

        >>> from ccdist_plugin.config import load_preset
        >>> from ccdist_plugin.data import load_dataset
        >>> from ccdist_plugin.trainer import Trainer, build_model
        >>> data = load_dataset("digits")
        >>> short = ["schedule.epochs=2", "schedule.ramp_up_epochs=1", "optim.lr_decay_epochs=[]"]
        >>> config = load_preset("digits").override([*short, "log.output_dir=runs/s"])  # loss: cc_dist
        >>> teacher = build_model(load_preset("digits-teacher"), data.spec)
        >>> trainer = Trainer(build_model(config, data.spec), config, teacher=teacher)
        >>> result = trainer.fit(data.train, data.test)
        >>> len(result.history), result.checkpoint.name
        (2, 'checkpoint.pt')
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        teacher: nn.Module | str | Path | None = None,
        loss: Any = None,
    ):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.config = config
        # under torchrun: this rank's device, the process group, rank 0's weights
        self.model, self.device = distributed.setup(model, resolve_device(config.device))
        if config.channels_last:  # a layout only: the same network, faster convolutions on CPU
            self.model = self.model.to(memory_format=torch.channels_last)
        if loss is None:
            teacher = teacher if teacher is not None else config.teacher.checkpoint
            if teacher is not None:
                teacher = load_teacher(teacher, self.device, config.channels_last)
            loss = build_loss(config, teacher)
        elif teacher is not None:
            raise ValueError(
                "pass teacher= only for the config's loss; a loss object (loss=) carries its own teacher"
            )
        if hasattr(loss, "check_student"):  # fail now, not at the first ramp batch
            loss.check_student(self.model)
        if config.optim.accumulate > 1:
            from ccdist_plugin.accumulate import check_accumulation

            if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules()):
                check_accumulation(self.model, loss)
        self.loss = loss
        # what a resumed run compares: the teacher's weights, wherever its file now lives
        self.teacher_sha256 = None if self.teacher is None else state_sha256(self.teacher)
        self.run_dir = Path(config.log.output_dir)
        self.checkpoint_path = self.run_dir / CHECKPOINT_NAME
        #: the (x, y) examples of the per-epoch validation metrics (set by :meth:`fit`; None: none)
        self.validation: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def teacher(self) -> CertifiedNet | None:
        """The loss's (frozen) teacher, or None."""
        return getattr(self.loss, "teacher", None)

    # ----------------------------------------------------------------------------------- public
    def fit(
        self,
        train_data: Any,
        val_data: Any = None,
        resume: bool | str | Path = False,
        allow_teacher_change: bool = False,
        overwrite: bool | None = None,
        on_epoch: Callable[[Trainer, dict[str, Any]], None] | None = None,
    ) -> FitResult:
        """Train for ``config.schedule.epochs`` epochs.

        Args:
            train_data: training examples (see module docstring), x in pixel space [0, 1].
            val_data: optional validation examples for the per-epoch clean / IBP-certified accuracy
                (the first ``config.log.val_size``).
            resume: ``True`` to continue from ``<output_dir>/checkpoint.pt``, or a checkpoint path. The
                checkpoint must come from the same config (apart from logging/device) and dataset,
                and the same teacher weights (the file may have moved).
            allow_teacher_change: resume towards a teacher whose weights differ from the checkpoint's.
            overwrite: what a new run (``resume`` false) does with an earlier run's checkpoint in
                ``output_dir``: ``False`` refuses (:class:`~ccdist_plugin.runlock.RunExistsError`,
                what ``ccdist train`` does without ``--overwrite``); ``True`` removes that run's
                outputs (:data:`~ccdist_plugin.runlock.TRAINING_OUTPUTS`) first; ``None`` (the
                default of the Python API) writes over them as the new run goes, with a warning.
            on_epoch: called as ``on_epoch(trainer, row)`` at the end of every epoch, after the
                validation metrics are in ``row`` and before the row is recorded (under torchrun:
                on every rank; the validation metrics are rank 0's). It may add metrics to ``row``
                (they are recorded with the epoch's; ``trainer.validation`` holds the validation
                examples, ``trainer.model`` the network). An exception it raises stops training: the
                epoch is recorded and checkpointed first, then the exception propagates (how
                ``ccdist tune`` prunes a trial).

        Raises:
            NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
            RunFolderLockedError: another live process is training into the same output folder.
            RunExistsError: ``overwrite=False`` and the folder holds an earlier run's checkpoint.
        """
        from ccdist_plugin.runlock import run_folder_lock

        with contextlib.ExitStack() as owner:  # the run owns its folder (and clears stale temporaries)
            failure = None
            if distributed.is_main_process():
                try:
                    owner.enter_context(run_folder_lock(self.run_dir))
                    if not resume:  # under the lock: a live run's checkpoint is never taken for an old one
                        self._claim_folder(overwrite)
                except (ValueError, OSError) as err:
                    failure = err
            if not distributed.all_finite(failure is None, self.device):  # under torchrun: all stop
                raise failure or ValueError(f"rank 0 could not take the run folder {self.run_dir}")
            return self._fit(train_data, val_data, resume, allow_teacher_change, on_epoch)

    def _claim_folder(self, overwrite: bool | None) -> None:
        """A new run in a folder holding an earlier run's checkpoint: refuse, clear, or warn."""
        from ccdist_plugin.runlock import TRAINING_OUTPUTS, claim_output_folder, describe_earlier_run

        if overwrite is None:
            found = describe_earlier_run(self.run_dir, (CHECKPOINT_NAME,))
            if found is not None:
                log.warning("%s holds an earlier run (%s); the new run writes over it", self.run_dir, found)
            return
        claim_output_folder(self.run_dir, (CHECKPOINT_NAME,), TRAINING_OUTPUTS, overwrite=overwrite)

    def _fit(
        self,
        train_data: Any,
        val_data: Any,
        resume: bool | str | Path,
        allow_teacher_change: bool,
        on_epoch: Callable[[Trainer, dict[str, Any]], None] | None = None,
    ):
        cfg = self.config
        _seed_everything(cfg.seed)
        batches = EpochBatches(
            train_data, cfg.optim.batch_size, True, cfg.data.augment, cfg.seed, self.device, cfg.channels_last
        )
        nb = len(batches)
        if nb == 0:
            raise ValueError("training data is empty")
        eps_schedule, lr_schedule = _schedules(cfg, nb)
        optimizer = build_optimizer(cfg, self.model)
        val = validation_tensors(val_data, cfg.log.val_size)
        self.validation = val
        if val is not None:  # checked once here; the training batches at their first step
            check_batch(self.model, val[0], val[1])

        self._checked_data = False
        start_epoch, global_step, history = 0, 0, []
        if resume:
            path = self.checkpoint_path if resume is True else Path(resume)
            payload = load_checkpoint(path, map_location=self.device)
            check_resumable(payload, cfg, batches.fingerprint, self.teacher_sha256, allow_teacher_change)
            self.model.load_state_dict(payload["model_state"])
            optimizer.load_state_dict(payload["optimizer_state"])
            start_epoch, global_step = int(payload["epoch"]), int(payload["global_step"])
            history = list(payload.get("history", []))
            restore_rng_state(distributed.rng_state_for_rank(payload))
            log.info("resumed from %s after epoch %d", path, start_epoch)

        main = distributed.is_main_process()  # rank 0 writes files, logs and shows progress
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.to_yaml(self.run_dir / "config.yaml")
            write_metrics(history, self.run_dir)
        writer = self._tensorboard() if main else None
        show = main and cfg.log.progress  # a bar only on a terminal (progress_bar); log lines per epoch
        try:
            for epoch in range(start_epoch, cfg.schedule.epochs):
                row, global_step = self._train_epoch(
                    epoch, batches, nb, eps_schedule, lr_schedule, optimizer, global_step, show
                )
                if main:
                    row.update(self._validate(val))
                stop: Exception | None = None
                if on_epoch is not None:
                    try:
                        on_epoch(self, row)
                    except Exception as err:  # recorded first, raised below
                        stop = err
                history.append(row)
                if main:
                    write_metrics(history, self.run_dir)
                if writer is not None:
                    for key, value in row.items():
                        if isinstance(value, (int, float)) and key != "epoch":
                            writer.add_scalar(key, value, epoch + 1)
                log.info("epoch %d/%d: %s", epoch + 1, cfg.schedule.epochs, format_row(row))
                last = epoch + 1 == cfg.schedule.epochs
                if last or stop is not None or (epoch + 1) % cfg.log.checkpoint_every == 0:
                    self._save(optimizer, epoch + 1, global_step, history, batches.fingerprint)
                if stop is not None:
                    raise stop
        finally:
            if writer is not None:
                writer.close()
        distributed.barrier()
        if cfg.log.plot and main:
            plot_curves(history, self.run_dir / "curves.png")
        self.model.eval()
        return FitResult(self.model, history, self.run_dir, self.checkpoint_path)

    # ---------------------------------------------------------------------------------- internals
    def _train_epoch(self, epoch, batches, nb, eps_schedule, lr_schedule, optimizer, global_step, show):
        cfg = self.config
        phase = eps_schedule.phase(epoch)
        sums: dict[str, float] = {}
        n_seen, correct, eps_t, lr = 0, 0, 0.0, 0.0
        start = time.perf_counter()
        bar = progress_bar(total=nb, enabled=show, desc=f"epoch {epoch + 1}/{cfg.schedule.epochs}")
        for b, (x, y) in enumerate(batches.epoch(epoch)):
            if x.shape[0] < 2:  # BatchNorm cannot train on one example (only a final remainder is this small)
                log.info("skipping a final batch of %d example(s) in epoch %d", x.shape[0], epoch + 1)
                continue
            if not self._checked_data:  # shapes, labels and pixel range of the data: once per fit
                check_batch(self.model, x, y)
                self._checked_data = True
            lr, eps_t = lr_schedule(epoch, b), eps_schedule(epoch, b)
            try:
                terms, logits = training_step(self.model, self.loss, optimizer, x, y, eps_t, lr, phase, cfg)
            except NonFiniteLossError as err:
                detail = ", ".join(f"{k}={v:.4g}" for k, v in err.terms.items())
                raise NonFiniteLossError(
                    f"non-finite training loss ({err.terms.get('loss')}) at epoch "
                    f"{epoch + 1}/{cfg.schedule.epochs}, "
                    f"batch {b + 1}/{nb} (eps_t={eps_t:.6g}, lr={lr:.3g}; terms: {detail}); stopping. "
                    + _last_checkpoint_note(self.checkpoint_path),
                    err.terms,
                ) from None
            global_step += 1
            bs = x.shape[0]
            n_seen += bs
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + value * bs
            if logits is not None:  # a device tensor: summed without a sync, read once per epoch
                correct = correct + (logits.argmax(1) == y).sum()
            bar.update(1)
            bar.set_postfix(loss=f"{terms['loss']:.3f}", eps=f"{eps_t:.4g}")
        bar.close()
        correct = int(correct)
        sums, n_seen, correct = distributed.reduce_sums(sums, n_seen, correct, device=self.device)
        row: dict[str, Any] = {"epoch": epoch + 1, "phase": phase, "eps": eps_t, "lr": lr}
        row.update({f"train_{k}": v / max(n_seen, 1) for k, v in sums.items()})
        if phase == "warmup":
            row["train_clean_acc"] = correct / max(n_seen, 1)
        row["time_s"] = time.perf_counter() - start
        return row, global_step

    @torch.no_grad()
    def _validate(self, val) -> dict[str, float]:
        if val is None:
            return {}
        from ccdist_plugin.bounds import certify

        x, y = val[0].to(self.device), val[1].to(self.device)
        self.model.eval()
        clean = float(sum((self.model(x[sl]).argmax(1) == y[sl]).sum() for sl in batch_slices(len(x), 512)))
        result = certify(self.model, x, y, self.config.eps, method="ibp")
        return {
            "val_clean_acc": clean / len(x),
            "val_ibp_cert_acc": float(result.certified.float().mean()),
            "val_size": len(x),
        }

    def _save(self, optimizer, epochs_done: int, global_step: int, history, fingerprint) -> None:
        model = self.model
        payload = {
            "role": self.config.role,
            "arch": dict(getattr(model, "arch", {})),
            "model_state": model.state_dict(),
            "optimizer_state": optimizer.state_dict(),
            "epoch": epochs_done,
            "global_step": global_step,
            "config": self.config.to_dict(),
            "dataset_fingerprint": fingerprint,
            "rng": capture_rng_state(),
            "history": history,
            "teacher_sha256": self.teacher_sha256,
        }
        rng_ranks = distributed.gather_objects(payload["rng"])  # every rank's generators (collective)
        if len(rng_ranks) > 1:
            payload["rng_ranks"] = rng_ranks
        if distributed.is_main_process():
            save_checkpoint(self.checkpoint_path, payload)

    def _tensorboard(self):
        if not self.config.log.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.debug("TensorBoard is not installed; skipping its logs")
            return None
        return SummaryWriter(str(self.run_dir / "tensorboard"))


def _last_checkpoint_note(path: Path) -> str:
    """Where a stopped run can be continued from (or that nothing was saved yet)."""
    if path.is_file():
        return f"The last good checkpoint is kept at {path} (continue with --resume after fixing the cause)"
    return f"No checkpoint was written yet (none at {path}); nothing to resume from"


def train_teacher(
    model: nn.Module,
    config: TrainConfig,
    train_data: Any,
    val_data: Any = None,
    resume: bool | str | Path = False,
) -> FitResult:
    """PGD adversarial training of a teacher (docs/method.md "Teacher"), e.g. ``cifar10-2-teacher``.

    The config should use ``loss.method: pgd_at`` (PGD-10, step 0.25ε, random start), SGD with
    momentum 0.9 and the cyclic lr; a config with ``role: student`` is refused.
    """
    if config.role != "teacher":
        raise ValueError(
            f"train_teacher needs a teacher config (role: teacher), got role {config.role!r}; "
            "use a '-teacher' preset such as cifar10-2-teacher"
        )
    return Trainer(model, config).fit(train_data, val_data, resume=resume)
