"""The one set of input checks (ccdist_plugin.validate): each fault is one clear ValueError, and the
per-step variant reads nothing back from the device."""

from __future__ import annotations

import pytest
import torch

from ccdist_plugin.models import mlp
from ccdist_plugin.validate import check_batch, check_box, check_pixel_range, eps_tensor


@pytest.fixture
def net():
    torch.manual_seed(0)
    return mlp(1, 8, 10, width=16, depth=1)


@pytest.mark.parametrize(
    "fault, message",
    [
        (lambda x, y: (torch.nn.Linear(2, 2), x, y, 0.1), "must be a CertifiedNet"),
        (lambda x, y: (None, x[:, :, :4], y, 0.1), "does not match the model's input shape"),
        (lambda x, y: (None, x.long(), y, 0.1), "floating-point"),
        (lambda x, y: (None, x, y[:3], 0.1), "labels of shape"),
        (lambda x, y: (None, x, y + 10, 0.1), r"labels must lie in \[0, 10\)"),
        (lambda x, y: (None, x * 255, y, 0.1), "pixel space"),
        (lambda x, y: (None, x, y, -0.1), "eps must be finite and >= 0"),
        (lambda x, y: (None, x, y, float("nan")), "eps must be finite and >= 0"),
        (lambda x, y: (None, x, y, torch.full((3,), 0.1)), "eps has 3 entries"),
        (lambda x, y: (None, x, y, torch.zeros(2, 2)), "scalar or a"),
    ],
)
def test_each_fault_is_one_clear_error(net, fault, message):
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    model, xb, yb, eps = fault(x, y)
    with pytest.raises(ValueError, match=message):
        check_batch(model if model is not None else net, xb, yb, eps)


def test_per_step_checks_skip_the_value_reads(net):
    """``values=False`` (the training step) checks shapes and a Python ε only: labels out of range
    and pixels outside [0, 1] are left to the once-per-call checks."""
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    check_batch(net, x * 2, y + 10, 0.1, values=False)
    with pytest.raises(ValueError, match="does not match"):
        check_batch(net, x[:, :, :4], y, 0.1, values=False)


def test_eps_tensor_and_box():
    x = torch.rand(3, 2)
    assert eps_tensor(0.5, x).shape == () and eps_tensor(torch.tensor([0.1, 0.2, 0.3]), x).shape == (3, 1)
    check_box(x, x + 1)
    with pytest.raises(ValueError, match="lower > upper"):
        check_box(x + 1, x)
    with pytest.raises(ValueError, match="differ in shape"):
        check_box(x, x[:2])
    check_pixel_range(torch.tensor([0.0, 1.0 + 1e-7]))  # rounding slack


def test_batch_slices_cover_the_range_once():
    from ccdist_plugin.batching import batch_slices

    for n, size in ((0, 3), (5, 2), (6, 3), (1, 512)):
        covered = [i for sl in batch_slices(n, size) for i in range(n)[sl]]
        assert covered == list(range(n)) and all(sl.stop - sl.start <= size for sl in batch_slices(n, size))
    with pytest.raises(ValueError, match="batch size"):
        batch_slices(4, 0)
