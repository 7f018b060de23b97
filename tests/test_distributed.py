"""torch.distributed training (2 CPU processes, gloo, launched with torchrun) and sharded verification.

- the sharded iterator: disjoint per-rank slices that together are exactly the single-process batches;
- ``torchrun --nproc-per-node 2 -m ccdist_plugin.cli train`` on digits: one checkpoint, rank-0 outputs,
  and the weights of a single-process run with the same global batch (BatchNorm-free MLP, attack
  without random start, no Shi regularizer: the loss is then a mean of per-example terms, so the
  two runs differ only by floating-point summation order; tolerance below);
- the 2-process run is interrupted in epoch 3 and resumed under torchrun (``--resume``) before the
  comparison; (slow) it ends bit-identical to an uninterrupted 2-process run;
- ``ccdist verify --shard i/3`` + ``--merge`` through the CLI with a fake α,β-CROWN, one shard dead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ccdist_plugin.checkpoint import load_checkpoint
from ccdist_plugin.config import load_config
from ccdist_plugin.distributed import ShardedBatchIterator, average_gradients, reduce_sums, shard_batches

torch.set_num_threads(1)

#: |single-process - 2-process| on every weight after the short run below (float32 summation order
#: of the gradient mean: one batch of 128 vs two halves weighted and all-reduced)
WEIGHT_ATOL = 1e-4

OVERRIDES = [
    "device=cpu",
    "loss.method=cc_ibp",
    "loss.attack.random_start=false",
    "model.width=32",
    "schedule.epochs=3",
    "schedule.warmup_epochs=1",
    "schedule.ramp_up_epochs=1",
    "optim.lr_decay_epochs=[2]",
    "optim.shi_lambda=0",
    "log.val_size=100",
    "log.progress=false",
    "log.tensorboard=false",
    "log.plot=false",
]

WORKER = textwrap.dedent(
    """
    import sys
    import torch
    torch.set_num_threads(1)
    from ccdist_plugin.config import TrainConfig
    from ccdist_plugin.trainer import Trainer, build_loss, build_model, load_data

    cfg = TrainConfig.from_yaml(sys.argv[1])
    fail_at = int(sys.argv[2])
    inner = build_loss(cfg)
    calls = 0

    def interrupting(model, x, y, eps):
        global calls
        calls += 1
        if calls == fail_at:  # the same step on every rank
            raise KeyboardInterrupt("interrupted")
        return inner(model, x, y, eps)

    data = load_data(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data.spec)
    try:
        Trainer(model, cfg, loss=interrupting).fit(data.train, data.test)
    except KeyboardInterrupt:
        sys.exit(3)
    """
)


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _torchrun(*args: str, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ccdist_plugin.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


# ------------------------------------------------------------------------------------------ data


@pytest.fixture(scope="module")
def digits_train():
    pytest.importorskip("sklearn")
    from ccdist_plugin.data import load_dataset

    return load_dataset("digits").train.subset(np.arange(203))


@pytest.mark.parametrize("augment", [False, True])
def test_sharded_batches_partition_the_single_process_batches(digits_train, augment):
    from ccdist_plugin.data import BatchIterator

    def make():
        return BatchIterator(digits_train, 64, shuffle=True, augment=augment, seed=5)

    single = make()
    single.set_epoch(3)
    reference = list(single)
    world = 3  # 203 = 3 * 64 + 11: the last global batch splits 4/4/3
    shards = [ShardedBatchIterator(make(), r, world) for r in range(world)]
    for s in shards:
        s.set_epoch(3)
    per_rank = [list(s) for s in shards]
    assert all(len(s) == len(reference) == 4 for s in shards)
    for b, (x_ref, y_ref) in enumerate(reference):
        x = torch.cat([per_rank[r][b][0] for r in range(world)])
        y = torch.cat([per_rank[r][b][1] for r in range(world)])
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    assert [len(per_rank[r][-1][1]) for r in range(world)] == [4, 4, 3]
    assert shards[0].epoch == 4  # advances like BatchIterator
    # a last global batch with fewer than 2 examples for some rank is dropped on every rank
    small = [ShardedBatchIterator(make(), r, 6) for r in range(6)]  # 11 examples left: < 2 for one rank
    assert {len(s) for s in small} == {3} and all(len(list(s)) == 3 for s in small)
    with pytest.raises(ValueError, match="too small"):
        ShardedBatchIterator(make(), 0, 40)


def test_helpers_are_identity_without_a_process_group():
    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.full((3,), 2.0)
    average_gradients([w], 7)
    assert torch.equal(w.grad, torch.full((3,), 2.0))
    assert reduce_sums({"a": 1.5}, 3) == ({"a": 1.5}, 3)
    marker = object()
    assert shard_batches(marker) is marker


# ------------------------------------------------------------------------------- torchrun training


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A single-process CLI run, and the same config under torchrun with 2 processes, interrupted in
    epoch 3 and resumed with ``--resume`` (module-scoped: three launches, ~40-60 s on 2 busy cores)."""
    pytest.importorskip("sklearn")
    root = tmp_path_factory.mktemp("ddp")
    cfg = load_config("digits", OVERRIDES)
    config = root / "config.yaml"
    cfg.to_yaml(config)
    single = _cli("train", "--config", str(config), "--quiet", "--output-dir", str(root / "single"))
    _ok(single)
    out = root / "ddp"
    load_config(str(config), [f"log.output_dir={out}"]).to_yaml(root / "worker.yaml")
    (root / "worker.py").write_text(WORKER)
    interrupted = _torchrun(str(root / "worker.py"), str(root / "worker.yaml"), str(12 + 3))  # epoch 3
    assert interrupted.returncode != 0, interrupted.stderr[-3000:]
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 2
    resumed = _torchrun(
        "-m", "ccdist_plugin.cli", "train", "--config", str(config), "--output-dir", str(out), "--resume"
    )
    _ok(resumed)
    return root, config, resumed


def test_two_processes_resumed_match_one_process(runs):
    root, _, resumed = runs
    files = sorted(p.name for p in (root / "ddp").iterdir())
    assert files == ["checkpoint.pt", "config.yaml", "metrics.csv", "metrics.jsonl"]  # one checkpoint
    assert resumed.stdout.count("done:") == 1  # rank 0 only
    a = load_checkpoint(root / "single" / "checkpoint.pt")
    b = load_checkpoint(root / "ddp" / "checkpoint.pt")
    assert a["global_step"] == b["global_step"] == 3 * 12  # 1497 examples / 128: same schedule
    assert len(b["rng_ranks"]) == 2
    for key, value in a["model_state"].items():
        diff = float((value - b["model_state"][key]).abs().max())
        assert diff <= WEIGHT_ATOL, f"{key}: {diff}"
    ha, hb = a["history"], b["history"]
    assert [r["epoch"] for r in hb] == [1, 2, 3]
    for ra, rb in zip(ha, hb, strict=True):  # epoch metrics over the whole global epoch
        assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=1e-3)
        assert rb["val_clean_acc"] == pytest.approx(ra["val_clean_acc"], abs=0.02)


@pytest.mark.slow
def test_resume_under_torchrun_is_bit_identical(runs):
    root, config, _ = runs
    full = _torchrun(
        "-m", "ccdist_plugin.cli", "train", "--config", str(config), "--output-dir", str(root / "full")
    )
    _ok(full)
    a = load_checkpoint(root / "full" / "checkpoint.pt")
    b = load_checkpoint(root / "ddp" / "checkpoint.pt")
    for key, value in a["model_state"].items():
        assert torch.equal(value, b["model_state"][key]), key


# --------------------------------------------------------------------------- sharded verification


def test_three_shards_and_merge_through_the_cli(tmp_path):
    from test_verify import calls, make_export, make_fake_abcrown

    from ccdist_plugin.cli import main

    export = make_export(tmp_path, ["bab"] * 7 + ["pre-certified", "attacked"])
    fake = make_fake_abcrown(tmp_path, {"point_000103.vnnlib": "sat"})
    runner = CliRunner()
    for i in (0, 2):  # shard 1/3 died before writing anything
        res = runner.invoke(
            main, ["verify", "--export", str(export), "--abcrown", str(fake), "--shard", f"{i}/3"]
        )
        assert res.exit_code == 0, res.output
    assert sorted(c.split()[0] for c in calls(fake)) == [
        f"point_{100 + i:06d}.vnnlib" for i in (0, 2, 3, 5, 6)
    ]
    merged = runner.invoke(main, ["verify", "--export", str(export), "--merge"])
    assert merged.exit_code == 0, merged.output
    report = json.loads((export / "verification.json").read_text())
    assert report["missing"] == [1, 4]  # instances r with r % 3 == 1: reported, not certified
    assert report["counts"]["missing"] == 2 and report["certified"] == 5  # 4 safe + 1 pre-certified
    res = runner.invoke(main, ["verify", "--export", str(export), "--abcrown", str(fake), "--shard", "1/3"])
    assert res.exit_code == 0, res.output
    runner.invoke(main, ["verify", "--export", str(export), "--merge"])
    report = json.loads((export / "verification.json").read_text())
    assert report["missing"] == [] and report["certified"] == 7


def test_sync_batchnorm_is_bounded_like_batchnorm():
    """``convert_sync_batchnorm`` gives ``_BatchNorm`` subclasses that ``ccdist_plugin.bounds`` accepts;
    without a process group (and in eval mode, as in certification) the bounds are the BatchNorm ones."""
    import copy

    from ccdist_plugin.bounds import margin_lower_bound
    from ccdist_plugin.distributed import convert_sync_batchnorm
    from ccdist_plugin.models import cnn7

    torch.manual_seed(0)
    model = cnn7(in_channels=1, input_size=8, num_classes=10, width=16, channels=[4, 4, 8, 8, 8])
    synced = convert_sync_batchnorm(copy.deepcopy(model))
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    for train in (True, False):
        model.train(train)
        synced.train(train)
        assert torch.equal(margin_lower_bound(model, x, y, 0.05), margin_lower_bound(synced, x, y, 0.05))
