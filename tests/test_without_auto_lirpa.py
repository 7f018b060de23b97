"""Without auto_LiRPA (simulated here where it is installed, so the full run checks it too): a network
only auto_LiRPA could bound raises UnsupportedLayerError naming the layer and the install command, in
every entry point; networks the native engine bounds are untouched. CI also runs the README's test
command in a virtual environment without auto_LiRPA (.ci/run), where this is the real case."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from ccdist_plugin.bounds import (
    AutoLirpaMissingError,
    UnsupportedLayerError,
    certify,
    check_boundable,
    crown_margin_lower_bound,
    input_box,
    margin_lower_bound,
    propagate_intervals,
)
from ccdist_plugin.bounds.lirpa import INSTALL_COMMAND, import_auto_lirpa
from ccdist_plugin.models import CertifiedNet, Normalize, mlp

INSTALL = "ccdist install-verifier"


@pytest.fixture(autouse=True)
def no_auto_lirpa(monkeypatch):
    """``import auto_LiRPA`` fails as it does where it is not installed (None in sys.modules)."""
    for name in [m for m in sys.modules if m == "auto_LiRPA" or m.startswith("auto_LiRPA.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "auto_LiRPA", None)


class OwnForward(nn.Module):
    """A user's block with its own forward (a residual sum): the native engine does not read it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 64, 16)

    def forward(self, x):
        h = self.conv(x)
        return torch.relu(self.fc((h + torch.relu(h)).flatten(1)))


def _net_with(layer: nn.Module) -> CertifiedNet:
    torch.manual_seed(0)
    features = nn.Sequential(
        Normalize([0.5], [0.5]),
        nn.Conv2d(1, 4, 3, padding=1),
        layer,
        nn.Flatten(),
        nn.Linear(256, 16),
        nn.ReLU(),
    )
    return CertifiedNet(features, nn.Linear(16, 10), (1, 8, 8), {"name": "user"}).eval()


def _points(n: int = 4):
    gen = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _says_layer_and_install(err: pytest.ExceptionInfo, layer: str) -> None:
    text = str(err.value)
    assert layer in text and INSTALL in text, text
    assert "\n" not in text, text  # one line
    assert isinstance(err.value, ImportError)  # what `except ImportError` callers catch


def test_the_install_command_is_the_one_the_messages_name():
    assert INSTALL_COMMAND == INSTALL
    with pytest.raises(AutoLirpaMissingError, match=INSTALL):
        import_auto_lirpa()


@pytest.mark.parametrize("layer,name", [(nn.LeakyReLU(), "LeakyReLU"), (nn.MaxPool2d(1), "MaxPool2d")])
def test_every_bound_names_the_layer_and_the_install_command(layer, name):
    net = _net_with(layer)
    x, y = _points()
    lo, hi = input_box(x, 0.01)
    calls = {
        "propagate_intervals": lambda: propagate_intervals(net.features, lo, hi),
        "margin_lower_bound": lambda: margin_lower_bound(net, x, y, 0.01),
        "crown_margin_lower_bound": lambda: crown_margin_lower_bound(net, x, y, 0.01),
        "certify ibp": lambda: certify(net, x, y, 0.01, method="ibp"),
        "certify crown": lambda: certify(net, x, y, 0.01, method="crown"),
        "check_boundable": lambda: check_boundable(net),
    }
    for what, call in calls.items():
        with pytest.raises(UnsupportedLayerError) as err:
            call()
        assert isinstance(err.value, AutoLirpaMissingError), what
        _says_layer_and_install(err, name)


def test_wrap_refuses_a_module_with_its_own_forward():
    with pytest.raises(UnsupportedLayerError) as err:
        CertifiedNet.wrap(OwnForward(), nn.Linear(16, 10), (1, 8, 8))
    _says_layer_and_install(err, "OwnForward")
    # wrap's own probe and shape checks come first: nothing but the missing engine is reported
    assert "auto_LiRPA" in str(err.value)


def test_asking_for_the_auto_lirpa_backend_says_how_to_install_it():
    net = mlp(1, 8, 10, width=16, depth=2).eval()
    x, y = _points()
    lo, hi = input_box(x, 0.01)
    with pytest.raises(AutoLirpaMissingError, match=INSTALL):
        propagate_intervals(net.features, lo, hi, backend="auto_lirpa")
    with pytest.raises(AutoLirpaMissingError, match=INSTALL):
        crown_margin_lower_bound(net, x, y, 0.01, backend="auto_lirpa")


def test_networks_the_native_engine_bounds_need_no_auto_lirpa():
    torch.manual_seed(0)
    net = mlp(1, 8, 10, width=16, depth=2).eval()
    x, y = _points()
    assert check_boundable(net) == "native"
    ibp = margin_lower_bound(net, x, y, 0.01)
    crown = crown_margin_lower_bound(net, x, y, 0.01)
    assert ibp.shape == crown.shape == (x.shape[0], 10)
    assert bool(torch.isfinite(ibp).all() and torch.isfinite(crown).all())
    wrapped = CertifiedNet.wrap(
        nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU()), nn.Linear(16, 10), (1, 8, 8)
    )
    assert check_boundable(wrapped) == "native"
