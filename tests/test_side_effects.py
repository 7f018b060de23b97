"""Bounds, attacks and exports never change the model they are given: parameters, buffers (BatchNorm
running statistics, num_batches_tracked) and every layer's train/eval flag are the same afterwards."""

from __future__ import annotations

import pytest
import torch

from ccdist_plugin.attacks import pgd_attack
from ccdist_plugin.bounds import (
    certify,
    crown_margin_lower_bound,
    feature_bounds,
    margin_lower_bound,
    propagate_intervals,
    resolve_crown_intermediate,
)
from ccdist_plugin.models import cnn3, mlp


def _snapshot(model: torch.nn.Module):
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    flags = {name: m.training for name, m in model.named_modules()}
    return state, flags


def _assert_unchanged(model: torch.nn.Module, snapshot, where: str = "") -> None:
    state, flags = snapshot
    now = model.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(now[key], value), f"{where}: {key} changed"
    changed = [n for n, m in model.named_modules() if m.training != flags[n]]
    assert not changed, f"{where}: train/eval flag changed on {changed}"


def _models():
    torch.manual_seed(0)
    # BatchNorm1d (the features' last BatchNorm) and BatchNorm2d
    yield "cnn3", cnn3(1, 8, 10, width=16, channels=(4, 8))
    yield "mlp-bn1d", mlp(1, 8, 10, width=16, depth=2, batch_norm=True)


def _modes(model):
    """train, eval, and train with one BatchNorm frozen in eval mode (mixed flags)."""
    yield "train", model.train()
    yield "eval", model.eval()
    model.train()
    next(m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)).eval()
    yield "mixed", model


CALLS = {
    "propagate_intervals": lambda m, x, y: propagate_intervals(m.features, x, x + 0.01, reference=x),
    "feature_bounds": lambda m, x, y: feature_bounds(m, x, 0.02),
    "margin_lower_bound": lambda m, x, y: margin_lower_bound(m, x, y, 0.02),
    "crown": lambda m, x, y: crown_margin_lower_bound(m, x, y, 0.02, intermediate="crown"),
    "crown-ibp": lambda m, x, y: crown_margin_lower_bound(m, x, y, 0.02, intermediate="ibp"),
    "crown-auto": lambda m, x, y: crown_margin_lower_bound(m, x, y, 0.02),
    "resolve_crown_intermediate": lambda m, x, y: resolve_crown_intermediate(m),
    "certify-ibp": lambda m, x, y: certify(m, x, y, 0.02),
    "certify-crown": lambda m, x, y: certify(m, x, y, 0.02, method="crown"),
    "pgd_attack": lambda m, x, y: pgd_attack(m, x, y, 0.02, steps=3),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_bounds_and_attacks_leave_the_model_unchanged(call):
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    for name, model in _models():
        for mode, m in _modes(model):
            snap = _snapshot(m)
            CALLS[call](m, x, y)
            _assert_unchanged(m, snap, f"{name} in {mode} mode")


def test_native_crown_in_train_mode_on_batchnorm1d_runs_and_matches_its_batch_statistics():
    """It used to run a forward pass on one example (moving the running statistics; BatchNorm1d
    refuses a batch of one in train mode)."""
    from ccdist_plugin.bounds import with_batch_statistics

    torch.manual_seed(0)
    model = mlp(1, 8, 10, width=16, depth=2, batch_norm=True).train()
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    snap = _snapshot(model)
    got = crown_margin_lower_bound(model, x, y, 0.02, intermediate="crown")
    _assert_unchanged(model, snap)
    want = crown_margin_lower_bound(with_batch_statistics(model, x), x, y, 0.02, intermediate="crown")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_export_onnx_of_the_unnormalized_view_leaves_shared_layers_as_they_were(tmp_path):
    pytest.importorskip("onnxruntime")
    from ccdist_plugin.verification import export_onnx

    for name, model in _models():
        for mode, m in _modes(model):
            snap = _snapshot(m)
            export_onnx(m.without_normalization(), tmp_path / f"{name}-{mode}.onnx", m.input_shape)
            _assert_unchanged(m, snap)


def test_evaluate_and_export_instances_leave_the_model_unchanged(tmp_path):
    pytest.importorskip("onnxruntime")
    from ccdist_plugin.evaluation import EvalSettings, evaluate
    from ccdist_plugin.verification import export_instances

    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    for name, model in _models():
        for mode, m in _modes(model):
            snap = _snapshot(m)
            evaluate(m, x, y, EvalSettings(eps=0.02, pgd_steps=2), progress=False)
            _assert_unchanged(m, snap)
            export_instances(m, (x, y), tmp_path / f"{name}-{mode}", 0.02, attack_steps=2, attack_restarts=1)
            _assert_unchanged(m, snap)
