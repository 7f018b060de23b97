"""Multi-process training with ``torch.distributed`` (one process per GPU or per CPU slot).

Launch any training command under ``torchrun`` (it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``)::

    torchrun --nproc-per-node 4 -m ccdist_plugin.cli train --config cifar10-2 --teacher teacher.pt

and :class:`~ccdist_plugin.trainer.Trainer` joins the process group itself (:func:`init_from_env`:
``nccl`` for CUDA devices, ``gloo`` for CPU). ``device: cuda`` maps each process to
``cuda:LOCAL_RANK``.

Design (docs/scaling.md has the long version):

- **Batches.** ``optim.batch_size`` stays the *global* batch. Every rank draws the same epoch-seeded
  global permutation (the one the single-process :class:`~ccdist_plugin.data.BatchIterator` uses) and
  takes its own contiguous slice of each global batch (:class:`ShardedBatchIterator`), so the number
  of optimizer steps per epoch, and with it the ε and learning-rate schedules per global step, is
  the single-process one. With augmentation the whole global batch is augmented with the batch's
  generator and then sliced, so every example sees the same crop/flip as in a single process.
- **Gradients.** The loss objects need the plain :class:`~ccdist_plugin.models.CertifiedNet`
  (``.features``, ``.head``, IBP through its layers); DistributedDataParallel only synchronizes
  gradients for work done through ``ddp_model.forward``, so calling a loss on ``ddp.module`` would
  silently skip the synchronization. The trainer therefore keeps the bare model and, after
  ``backward``, calls :func:`average_gradients`: one all-reduce of a flat buffer holding
  ``n_r · g_r`` of every rank and ``n_r`` (local batch size), divided by ``Σ n_r``. That is exactly
  the gradient of the mean loss over the global batch (also when the last batch splits unevenly),
  and terms that every rank adds identically (the ℓ1 penalty) keep weight 1, not ``world_size``.
  Clipping and the optimizer step then run on identical gradients on every rank, so the replicas
  stay equal without broadcasting parameters. :func:`wrap_ddp` exists for custom loops that call
  the model's own ``forward``.
- **BatchNorm.** Per-process statistics by default, as in the reference implementations: each rank
  normalizes (and bounds, IBP in train mode uses the statistics of the same adversarial batch as the
  forward pass) with its local batch. Running statistics are rank 0's (the checkpoint holds rank 0's
  model, as DDP's ``broadcast_buffers`` would make them). :func:`convert_sync_batchnorm` switches to
  ``nn.SyncBatchNorm`` (CUDA only; see its docstring for what that does to IBP).
- **Rank 0** writes the checkpoint, metrics, config.yaml, TensorBoard and plots, shows progress bars
  and logs at INFO; the other ranks log warnings only. Every rank loads the teacher.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "DistInfo",
    "env_info",
    "init_from_env",
    "setup",
    "cleanup",
    "is_active",
    "rank",
    "world_size",
    "is_main_process",
    "local_device",
    "barrier",
    "broadcast_module",
    "average_gradients",
    "all_finite",
    "reduce_sums",
    "gather_objects",
    "ShardedBatchIterator",
    "shard_batches",
    "wrap_ddp",
    "convert_sync_batchnorm",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a ``torchrun`` launch (read from the environment).

    Attributes:
        rank: global rank (``RANK``, 0 without torchrun).
        world_size: number of processes (``WORLD_SIZE``, 1 without torchrun).
        local_rank: rank on this machine (``LOCAL_RANK``), picks the GPU.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def env_info() -> DistInfo:
    """The ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set by torchrun (or SLURM's srun + torchrun)."""
    try:
        info = DistInfo(
            int(os.environ.get("RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)),
        )
    except ValueError as err:
        raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {err}") from err
    if info.world_size <= 1:  # a stray RANK without WORLD_SIZE is not a launch
        return DistInfo()
    if not 0 <= info.rank < info.world_size:
        raise ValueError(f"invalid RANK={info.rank} for WORLD_SIZE={info.world_size}")
    return info


def is_active() -> bool:
    """True when a process group with more than one process is initialized."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 when not distributed; from the environment before init)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return env_info().rank


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return env_info().world_size


def is_main_process() -> bool:
    """True on rank 0 (and in a plain single process): the one that writes files and logs."""
    return rank() == 0


def local_device(device: torch.device | str) -> torch.device:
    """``cuda`` (no index) → ``cuda:LOCAL_RANK`` under torchrun; anything else unchanged."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and env_info().world_size > 1:
        return torch.device("cuda", env_info().local_rank)
    return device


def init_from_env(device: torch.device | str, timeout_s: float = 1800.0) -> bool:
    """Join the process group torchrun describes; a no-op without torchrun or when already joined.

    Backend: ``nccl`` when ``device`` is CUDA (after ``torch.cuda.set_device``), else ``gloo``.

    Returns:
        True when this call initialized the group (so :func:`cleanup` should destroy it).
    """
    info = env_info()
    if info.world_size <= 1 or dist.is_initialized():
        return False
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_device(device))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    log.info("rank %d/%d joined the %s process group", info.rank, info.world_size, backend)
    return True


def setup(model: nn.Module, device: torch.device | str) -> tuple[nn.Module, torch.device]:
    """Everything a training process does before its first step, in one call: pick this rank's
    device (:func:`local_device`), join the torchrun process group (:func:`init_from_env`), move
    ``model`` there and give every rank rank 0's weights (:func:`broadcast_module`). Without
    torchrun it only moves the model.

    Returns:
        ``(model, device)``.
    """
    device = local_device(device)
    init_from_env(device)
    model = model.to(device)
    broadcast_module(model)
    return model, device


def cleanup() -> None:
    """Destroy the process group if one is initialized (end of a torchrun command)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_active():
        dist.barrier()


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Copy ``src``'s parameters and buffers to every rank (no-op when not distributed)."""
    if not is_active():
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src)


def average_gradients(params: Sequence[torch.Tensor], weight: float) -> None:
    """Replace each ``p.grad`` by the ``weight``-weighted mean over ranks (in place, one all-reduce).

    With ``weight`` = the local batch size and each rank's gradient that of its local mean loss, the
    result is the gradient of the mean loss over the global batch: Σ_r n_r g_r / Σ_r n_r. Parameters
    without a gradient count as zero gradients (their ``grad`` is set). No-op when not distributed.

    Args:
        params: the trainable parameters, in the same order on every rank.
        weight: this rank's weight (its number of examples in the step), > 0.
    """
    if weight <= 0:
        raise ValueError(f"average_gradients: weight must be > 0, got {weight}")
    if not is_active():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    # one buffer [n_r g_r, n_r]: a single all-reduce gives [Σ n_r g_r, Σ n_r]
    buffer = torch.cat([p.grad.reshape(-1) for p in params] + [params[0].grad.new_ones(1)])
    buffer.mul_(float(weight))
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    buffer = buffer[:-1].div_(buffer[-1])  # on the device: no host synchronization
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(buffer[offset : offset + n].view_as(p.grad))
        offset += n


def all_finite(finite: bool, device: torch.device | str = "cpu") -> bool:
    """Whether ``finite`` holds on every rank (one scalar all-reduce; the local value when not distributed).

    Every rank gets the same answer, so a NaN on one rank stops all of them instead of leaving the
    others waiting in the next gradient all-reduce.
    """
    if not is_active():
        return finite
    flag = torch.tensor([0.0 if finite else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    return float(flag) == 0.0


def reduce_sums(
    sums: dict[str, float], *counts: float, device: torch.device | str = "cpu"
) -> tuple[dict[str, float], ...]:
    """Sum ``sums`` (same keys on every rank) and ``counts`` over ranks; returns ``(sums, *counts)``.

    Used for the epoch's training metrics (sums of batch-size-weighted terms and example counts), so
    that rank 0 logs the metrics of the whole global epoch. Unchanged when not distributed.
    """
    if not is_active():
        return (dict(sums), *counts)
    keys = sorted(sums)
    values = torch.tensor([float(sums[k]) for k in keys] + [float(c) for c in counts], dtype=torch.float64)
    if torch.device(device).type == "cuda":  # nccl reduces CUDA tensors only
        values = values.to(device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    values = values.cpu().tolist()
    reduced_counts = values[len(keys) :]
    counts_out = tuple(
        int(v) if isinstance(c, int) else v for v, c in zip(reduced_counts, counts, strict=True)
    )
    return (dict(zip(keys, values[: len(keys)], strict=True)), *counts_out)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` when not distributed."""
    if not is_active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------- data


def _split_bounds(n: int, parts: int) -> list[int]:
    """Boundaries of ``np.array_split``: the first ``n % parts`` parts get one more element."""
    q, r = divmod(n, parts)
    sizes = [q + (1 if i < r else 0) for i in range(parts)]
    return [0] + list(np.cumsum(sizes))


class ShardedBatchIterator:
    """Per-rank slices of the global batches of a :class:`~ccdist_plugin.data.BatchIterator`.

    The DistributedSampler equivalent for this project's iterator: the order of epoch ``e`` is the
    single-process permutation (same seed, same epoch), global batch ``b`` is the single-process
    batch ``b`` (``base.batch_size`` examples, the global batch), and rank ``r`` of ``W`` takes its
    contiguous part (``np.array_split`` sizes: equal when ``W`` divides the batch, else the first
    ranks get one more). Disjoint across ranks, together exactly the single-process epoch.

    With augmentation the whole global batch is augmented with its ``(seed, epoch, b)`` generator
    and then sliced (identical crops/flips to a single process at the price of loading the global
    batch on every rank; without augmentation only the local slice is loaded).

    Batches where some rank would get fewer than ``min_local`` examples (only a last, small global
    batch) are dropped on every rank, with a log line: all ranks must take the same number of steps,
    and a train-mode BatchNorm needs at least 2 examples.

    Args:
        base: the single-process iterator (its dataset, global batch size, shuffle, augment, seed, device).
        rank: this process's rank.
        world_size: number of processes.
        min_local: the smallest local batch kept (2).
    """

    def __init__(self, base: Any, rank: int, world_size: int, min_local: int = 2):
        from ccdist_plugin.data import BatchIterator

        if not isinstance(base, BatchIterator):
            raise TypeError(f"ShardedBatchIterator needs a BatchIterator, got {type(base).__name__}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        if base.batch_size < world_size * min_local:
            raise ValueError(
                f"global batch size {base.batch_size} is too small for {world_size} processes: each needs "
                f"at least {min_local} examples per step (use optim.batch_size >= {world_size * min_local})"
            )
        self.base, self.rank, self.world_size, self.min_local = base, rank, world_size, min_local
        self.dataset = base.dataset
        self.batch_size = base.batch_size
        self.epoch = base.epoch
        self.start_batch = base.start_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next iteration produce epoch ``epoch`` from global batch ``start_batch``."""
        self.base.set_epoch(epoch, start_batch)
        self.epoch, self.start_batch = self.base.epoch, self.base.start_batch

    def _global_batches(self) -> int:
        n = len(self.dataset)
        full, rest = divmod(n, self.batch_size)
        if self.base.drop_last or rest == 0:
            return full
        return full + (1 if rest >= self.world_size * self.min_local else 0)

    def __len__(self) -> int:
        return self._global_batches()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        base = self.base
        epoch, start = self.base.epoch, self.base.start_batch
        order = base.order(epoch)
        count = self._global_batches()
        dropped = -(-len(self.dataset) // self.batch_size) - count
        if dropped and not base.drop_last and start <= count:
            log.info(
                "dropping the last global batch of %d example(s) in epoch %d: fewer than %d per process",
                len(self.dataset) % self.batch_size,
                epoch + 1,
                self.min_local,
            )
        for b in range(start, count):
            positions = order[b * self.batch_size : (b + 1) * self.batch_size]
            bounds = _split_bounds(len(positions), self.world_size)
            lo, hi = bounds[self.rank], bounds[self.rank + 1]
            if base.augment:
                x, y = base.batch(positions, epoch, b)
                yield x[lo:hi], y[lo:hi]
            else:
                yield base.batch(positions[lo:hi], epoch, b)
        base.set_epoch(epoch + 1)
        self.epoch, self.start_batch = epoch + 1, 0


def shard_batches(iterator: Any) -> Any:
    """``iterator`` unchanged in a single process; its :class:`ShardedBatchIterator` under torchrun.

    Raises:
        ValueError: distributed training with data that is not a ``ccdist_plugin.data`` dataset
            (``iterator`` is None): only those have the deterministic global order the ranks share.
    """
    if not is_active():
        return iterator
    if iterator is None:
        raise ValueError(
            "distributed training needs a ccdist_plugin.data dataset (ArrayDataset) or a BatchIterator as "
            "training data, so that every process shares one epoch-seeded order; convert tensors with "
            "ccdist_plugin.data.ArrayDataset"
        )
    return ShardedBatchIterator(iterator, dist.get_rank(), dist.get_world_size())


# ----------------------------------------------------------------------------------- wrappers


def wrap_ddp(model: nn.Module, device: torch.device | str, **kwargs: Any) -> nn.Module:
    """``DistributedDataParallel(model)`` for custom loops that call ``ddp(x)`` (unchanged when not
    distributed). The :class:`~ccdist_plugin.trainer.Trainer` does not use it: its losses run on the
    bare model (IBP through ``.features``/``.head``), which DDP's hooks would not see; it calls
    :func:`average_gradients` instead.
    """
    if not is_active():
        return model
    device = torch.device(device)
    ids = [device] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, **kwargs)


def convert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm by ``nn.SyncBatchNorm`` (statistics over the global batch).

    ``nn.SyncBatchNorm`` is a ``_BatchNorm`` subclass, so ``ccdist_plugin.bounds`` accepts it, but
    note what that means in training: the forward pass of the (adversarial) batch normalizes with the
    *global* batch statistics, while the IBP bounds compute the train-mode statistics from the local
    reference batch of this rank only. Bounds and forward pass then use different statistics (the
    bounds remain a valid training signal, but are not the bounds of the function the forward pass
    computed). Certification is unaffected: it runs in eval mode with the running statistics, which
    SyncBatchNorm accumulates from the global batch. PyTorch runs SyncBatchNorm in train mode on
    CUDA only (on CPU with a process group it raises), so this option is for ``nccl`` runs; the
    checkpoint stores plain BatchNorm state (``load_model`` rebuilds ``nn.BatchNorm``).
    """
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


def rng_state_for_rank(payload: dict[str, Any]) -> dict[str, Any]:
    """The generator states a resumed rank restores from a checkpoint's ``payload``.

    A checkpoint written under torchrun holds every rank's states (``rng_ranks``); resuming with the
    same number of processes restores each rank's own (bit-exact resume). Otherwise (a single-process
    checkpoint, or another world size) every rank takes the saved ``rng`` (rank 0's) and, on ranks > 0,
    then reseeds torch's generator from it and its rank, so the attack noise still differs per rank.
    """
    states = payload.get("rng_ranks")
    r, n = rank(), world_size()
    if states is not None and len(states) == n:
        return states[r]
    if states is not None or n > 1:
        log.warning(
            "checkpoint written by %d process(es), resumed by %d: the data order and schedules continue "
            "exactly, the random attack noise does not",
            len(states) if states is not None else 1,
            n,
        )
    state = dict(payload["rng"])
    if r > 0:
        gen = torch.Generator().manual_seed(int(state["torch"].cpu()[:8].sum()) + r)
        state["torch"] = gen.get_state()
    return state
