"""ε and learning-rate schedules: the shape SPEC.md asks for."""

from __future__ import annotations

import numpy as np
import pytest

from ccdist_plugin.schedules import EpsSchedule, LRSchedule, cyclic_lr, smoothed_eps, step_decay_lr


def _values(schedule: EpsSchedule, epochs: int) -> np.ndarray:
    return np.array([schedule(e, b) for e in range(epochs) for b in range(schedule.batches_per_epoch)])


def test_eps_schedule_shape():
    eps, nb = 8 / 255, 200
    s = EpsSchedule(eps, warmup_epochs=1, ramp_up_epochs=4, batches_per_epoch=nb)
    v = _values(s, 7)
    assert np.all(v[:nb] == 0)  # warm-up
    ramp = v[nb : 5 * nb]
    assert ramp[0] == 0.0  # starts at 0
    assert ramp[-1] == eps  # reaches eps exactly at the end of ramp-up
    assert np.all(v[5 * nb :] == eps)  # then constant
    assert np.all(np.diff(v) >= 0)  # monotone
    assert [s.phase(e) for e in range(7)] == ["warmup"] + ["ramp"] * 4 + ["constant"] * 2
    # smooth: first differences (slopes) change by a small amount from batch to batch, no jump at the switch
    slopes = np.diff(ramp)
    assert np.max(np.abs(np.diff(slopes))) < 0.05 * np.max(slopes)
    # polynomial of degree 4 over the first quarter: eps(s) proportional to s^4 there
    steps = 4 * nb - 1
    s1, s2 = 10, 20
    assert ramp[s2] / ramp[s1] == pytest.approx((s2 / s1) ** 4)
    # linear over the remaining three quarters
    lin = ramp[int(0.25 * steps) + 2 :]
    assert np.allclose(np.diff(lin), np.diff(lin)[0], rtol=1e-6, atol=1e-12)


def test_smoothed_eps_slopes_match_at_midpoint():
    ramp, eps, mid = 1000.0, 0.3, 0.25
    m = mid * ramp
    h = 1e-4
    left = (smoothed_eps(m, ramp, eps) - smoothed_eps(m - h, ramp, eps)) / h
    right = (smoothed_eps(m + h, ramp, eps) - smoothed_eps(m, ramp, eps)) / h
    assert left == pytest.approx(right, rel=1e-3)
    # linear slope = (eps - eps(m)) / (ramp - m)
    assert right == pytest.approx((eps - smoothed_eps(m, ramp, eps)) / (ramp - m), rel=1e-3)
    assert smoothed_eps(-5, ramp, eps) == 0.0 and smoothed_eps(ramp + 5, ramp, eps) == eps


def test_no_ramp_is_constant_after_warmup():
    s = EpsSchedule(0.1, warmup_epochs=0, ramp_up_epochs=0, batches_per_epoch=3)
    assert set(_values(s, 2)) == {0.1}


def test_step_decay():
    lrs = [step_decay_lr(5e-4, e, (120, 140), 0.2) for e in (0, 119, 120, 139, 140, 159)]
    assert lrs == pytest.approx([5e-4, 5e-4, 1e-4, 1e-4, 2e-5, 2e-5])


def test_cyclic_lr_triangle():
    epochs, nb = 10, 20
    v = np.array([cyclic_lr(0.2, e, b, nb, epochs) for e in range(epochs) for b in range(nb)])
    top = int(np.argmax(v))
    assert v.max() == pytest.approx(0.2)
    assert top == epochs * nb // 2 - 1  # peak at the end of the first half
    assert np.all(np.diff(v[: top + 1]) > 0) and np.all(np.diff(v[top:]) < 0)
    assert v[0] == pytest.approx(0.2 / (epochs * nb / 2)) and v[-1] == pytest.approx(0.0)
    sched = LRSchedule("cyclic", 0.2, epochs, nb)
    assert sched(3, 4) == cyclic_lr(0.2, 3, 4, nb, epochs)
    with pytest.raises(ValueError, match="unknown kind"):
        LRSchedule("cosine", 0.1, 1, 1)
