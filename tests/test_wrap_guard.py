"""User models cannot be bounded wrongly: ``CertifiedNet.wrap`` refuses a features module whose
bounded graph is not its forward, and certification (the pre-filter of ``evaluate`` and of the
α,β-CROWN export) raises a soundness alarm and certifies nothing when a model got past ``wrap``.

The three models are those of the report: a branch on a batch statistic, a branch on the batch
size, a per-sample Python loop over the batch. Without the guard the first two give IBP lower bounds
above margins sampled inside the ball, silently, and the third fails later inside torch.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import AUTO_LIRPA_MISSING, requires_auto_lirpa
from torch import nn

from ccdist_plugin.bounds import check_boundable, graphcheck, margin_lower_bound
from ccdist_plugin.bounds.graphcheck import (
    BoundedGraphMismatch,
    check_margins_at_points,
    graph_is_forward_by_construction,
)
from ccdist_plugin.evaluation import EvalSettings, evaluate, prefilter
from ccdist_plugin.models import CertifiedNet, Residual, cnn3, cnn7, mlp, preact_resnet18
from ccdist_plugin.soundness import sampled_extremes

EPS = 0.002  # the radius of the report's measurement on digits


class BatchStatisticBranch(nn.Module):
    """``relu(b(v)) if v.mean() > t else relu(a(v))``: the branch depends on the whole batch."""

    def __init__(self, threshold: float):
        super().__init__()
        self.a, self.b, self.threshold = nn.Linear(64, 32), nn.Linear(64, 32), threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.flatten(1)
        return torch.relu(self.b(v)) if v.mean() > self.threshold else torch.relu(self.a(v))


class BatchSizeBranch(nn.Module):
    """``h * 3 if h.shape[0] > 2 else h``: the output depends on the batch size."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(x.flatten(1)))
        return h * 3 if h.shape[0] > 2 else h


class PerSampleLoop(nn.Module):
    """A Python loop over the batch, one sample at a time (the tracer does not warn about this one)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.relu(self.fc(v.flatten(1))) for v in x.split(1)])


class DoublingSequential(nn.Sequential):
    """A container the native engine walks as its layers, whose forward computes something else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


@pytest.fixture(scope="module")
def batch(digits):
    """64 digits with the two darkest first: auto_LiRPA traces the features on the first two rows
    of the first box it bounds, so a threshold between their mean and the batch's mean puts the
    traced branch and the forward's branch on opposite sides."""
    x, y = digits[0][:64], digits[1][:64]
    order = x.flatten(1).mean(1).argsort()
    order = torch.cat([order[:2], order[2:].sort().values])
    return x[order], y[order]


def _threshold(x: torch.Tensor) -> float:
    return float((x[:2].mean() + x.mean()) / 2)


def _model(name: str, x: torch.Tensor, check_bounds: bool = True) -> CertifiedNet:
    torch.manual_seed(0)
    features = {
        "batch_statistic": lambda: BatchStatisticBranch(_threshold(x)),
        "batch_size": BatchSizeBranch,
        "per_sample_loop": PerSampleLoop,
    }[name]()
    return CertifiedNet.wrap(features, nn.Linear(32, 10), (1, 8, 8), check_bounds=check_bounds).eval()


def _patched_after_wrap() -> CertifiedNet:
    """A model ``wrap`` accepts (native engine), whose ReLU's forward is replaced afterwards."""
    torch.manual_seed(0)
    features = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())
    net = CertifiedNet.wrap(features, nn.Linear(32, 10), (1, 8, 8)).eval()
    assert check_boundable(net) == "native"
    net.features[1][2].forward = lambda v: 3 * torch.relu(v)
    return net


MODELS = ("batch_statistic", "batch_size", "per_sample_loop")
#: the per-sample loop has no trace warning: only the comparison with auto_LiRPA's graph finds it
NEEDS_LIRPA = {"per_sample_loop": requires_auto_lirpa}


def _params(names):
    return [pytest.param(n, marks=NEEDS_LIRPA[n]) if n in NEEDS_LIRPA else n for n in names]


# --------------------------------------------------------------------------------------------
# The hazard: what these models did before the guard
# --------------------------------------------------------------------------------------------


@requires_auto_lirpa
@pytest.mark.autolirpa
@pytest.mark.parametrize("name", ["batch_statistic", "batch_size"])
def test_unguarded_branching_models_get_bounds_above_sampled_margins(name, batch):
    x, y = batch
    net = _model(name, x, check_bounds=False)
    z = margin_lower_bound(net, x, y, EPS)
    sampled = sampled_extremes(net, x, y, EPS, 20, torch.Generator().manual_seed(0))
    violations = int((z > sampled.z_min + 1e-5).sum())
    assert violations > 0, "the unguarded model no longer shows the unsound bound this guard is for"


@requires_auto_lirpa
@pytest.mark.autolirpa
def test_unguarded_per_sample_loop_fails_later_inside_torch(batch):
    x, y = batch
    net = _model("per_sample_loop", x, check_bounds=False)
    with pytest.raises(RuntimeError):
        margin_lower_bound(net, x, y, EPS)


# --------------------------------------------------------------------------------------------
# wrap refuses them, with one error naming the problem
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, problem",
    [
        ("batch_statistic", r"data-dependent control flow: tracing them warns at .*test_wrap_guard\.py"),
        ("batch_size", r"data-dependent control flow: tracing them warns at .*test_wrap_guard\.py"),
        ("per_sample_loop", r"not the graph the bounds describe: on a batch of \d+"),
    ],
    ids=MODELS,
)
def test_wrap_refuses_each_model_with_one_error(name, problem, batch):
    if name in NEEDS_LIRPA:
        pytest.importorskip("auto_LiRPA", reason=AUTO_LIRPA_MISSING)
    with pytest.raises(BoundedGraphMismatch, match=rf"^CertifiedNet\.wrap: .*{problem}") as info:
        _model(name, batch[0])
    message = str(info.value)
    assert isinstance(info.value, ValueError) and "\n" not in message
    assert "no `if` on a tensor, no loop over the batch" in message  # what to do
    assert info.value.__cause__ is None and info.value.__suppress_context__  # one error, no chain


@requires_auto_lirpa
@pytest.mark.autolirpa
@pytest.mark.parametrize("name", MODELS)
def test_the_probe_comparison_alone_refuses_each_model(name, batch, monkeypatch):
    """Without the trace-warning check, comparing the forward with the bounded graph on the probe
    batches (sizes 1 to 5, corners and levels of the box) still refuses all three."""
    monkeypatch.setattr(graphcheck, "check_traces_cleanly", lambda features, example: None)
    with pytest.raises(BoundedGraphMismatch, match="not the graph the bounds describe: on a batch of"):
        _model(name, batch[0])


def test_wrap_refuses_a_container_whose_forward_is_not_its_layers():
    """The native engine walks an ``nn.Sequential``'s layers: a subclass with its own forward is
    refused by the comparison (no trace warning, no auto_LiRPA involved)."""
    features = DoublingSequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
    with pytest.raises(BoundedGraphMismatch, match=r"differ from the bounded graph's by up to"):
        CertifiedNet.wrap(features, nn.Linear(16, 10), (1, 8, 8))


class ViewFlatten(nn.Module):
    """A plain model with its own forward and a batch-size-aware but data-independent reshape."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(256, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.conv(x)))
        return torch.relu(self.fc(h.view(h.size(0), -1)))


@requires_auto_lirpa
@pytest.mark.autolirpa
def test_ordinary_models_are_accepted_and_left_as_they_were(batch):
    torch.manual_seed(0)
    features = ViewFlatten().train()
    before = {k: v.clone() for k, v in features.state_dict().items()}
    net = CertifiedNet.wrap(features, nn.Linear(16, 10), (1, 8, 8), mean=[0.3], std=[0.4])
    assert check_boundable(net) == "auto_lirpa" and not graph_is_forward_by_construction(net.features)
    after = features.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics not moved
    assert all(m.training for m in features.modules())  # its train mode kept
    x, y = batch
    pre = prefilter(net.eval(), x[:16], y[:16], EPS, attack=None)
    assert pre.soundness_alarm is None and "alarm" not in pre.status


def test_built_in_and_native_networks_are_their_graph_by_construction():
    """The checks cost nothing on them: the graph the native engine walks is their forward."""
    built_in = [
        mlp(1, 8, 10),
        cnn3(1, 8, 10),
        cnn7(1, 8, 10, channels=(4,) * 5),
        preact_resnet18(1, 8, 10, width=2),
    ]
    assert all(graph_is_forward_by_construction(m.features) for m in built_in)
    seq = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), Residual(nn.Sequential(nn.BatchNorm2d(4), nn.ReLU())), nn.Flatten()
    )
    net = CertifiedNet.wrap(seq, nn.Linear(256, 10), (1, 8, 8))
    assert check_boundable(net) == "native" and graph_is_forward_by_construction(net.features)
    hooked = mlp(1, 8, 10)
    hooked.features[2].register_forward_hook(lambda module, args, out: out * 2)
    assert not graph_is_forward_by_construction(hooked.features)
    assert not graph_is_forward_by_construction(_patched_after_wrap().features)


# --------------------------------------------------------------------------------------------
# Past wrap: certification raises the soundness alarm and certifies nothing
# --------------------------------------------------------------------------------------------


def _injected(name: str, x: torch.Tensor) -> CertifiedNet:
    return _patched_after_wrap() if name == "patched_after_wrap" else _model(name, x, check_bounds=False)


INJECTED = (*MODELS, "patched_after_wrap")


@pytest.mark.parametrize("name", _params(INJECTED))
def test_eval_prefilter_alarms_and_certifies_nothing(name, batch):
    x, y = batch[0][:32], batch[1][:32]
    net = _injected(name, x)
    pre = prefilter(net, x, y, EPS, attack=None)
    assert pre.soundness_alarm is not None and "soundness alarm, nothing certified" in pre.soundness_alarm
    assert not any(s.startswith("certified") for s in pre.status)
    assert all(s == "alarm" for s, c in zip(pre.status, pre.correct.tolist(), strict=True) if c)
    assert not pre.proved.any() and not any(c.any() for c in pre.certified.values())
    result = evaluate(net, x, y, EvalSettings(eps=EPS, pgd_steps=2), progress=False)
    assert result.soundness_alarms == [pre.soundness_alarm]
    cert = {k: v for k, v in result.metrics.items() if k.endswith("cert_acc") and v is not None}
    assert cert and all(v == 0.0 for v in cert.values()), result.metrics
    assert result.metrics["ibp_loss"] is None
    assert result.metrics["standard_acc"] is not None  # the other figures are still reported


@pytest.mark.parametrize("name", _params(INJECTED))
def test_export_prefilter_alarms_and_exports_nothing(name, batch, tmp_path):
    from ccdist_plugin.verification import export_instances

    x, y = batch[0][:8], batch[1][:8]
    net = _injected(name, x)
    out = tmp_path / "export"
    (out / "vnnlib").mkdir(parents=True)
    earlier = {
        out / "manifest.json": json.dumps({"earlier": True}),
        out / "vnnlib" / "point_0.vnnlib": "(earlier)",
    }
    for path, text in earlier.items():
        path.write_text(text)
    with pytest.raises(BoundedGraphMismatch, match=r"^nothing exported: soundness alarm, nothing certified"):
        export_instances(net, (x, y), out, EPS, attack_steps=2, attack_restarts=1)
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == {
        "manifest.json",
        "vnnlib/point_0.vnnlib",
    }
    assert all(path.read_text() == text for path, text in earlier.items())  # the earlier export is whole


def test_a_bound_above_the_margin_at_the_point_is_an_alarm():
    logits = torch.tensor([[2.0, 0.5, -1.0]], dtype=torch.float64)
    y = torch.tensor([0])
    exact = torch.tensor([[float("inf"), 1.5, 3.0]], dtype=torch.float64)  # entry y is ignored
    check_margins_at_points(logits, y, exact)  # a bound may equal the margin at the centre
    with pytest.raises(BoundedGraphMismatch, match=r"exceed the network's own differences at points \[0\]"):
        check_margins_at_points(logits, y, exact + torch.tensor([[0.0, 1e-3, 0.0]], dtype=torch.float64))
    check_margins_at_points(logits, y, torch.full_like(exact, float("nan")))  # proves nothing: no alarm
