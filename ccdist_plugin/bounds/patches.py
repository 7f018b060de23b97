"""CROWN back-substitution in patches form, for the pre-activation bounds of convolutional feature maps.

A neuron at position (h, w) of a convolution's output depends on a window (its receptive field) of
every feature map below it, so the coefficients of its bound are non-zero only there. This engine
keeps, per bounded neuron, the coefficients on that window alone, shaped (C, kh, kw), where the
dense engine (:func:`ccdist_plugin.bounds.crown.back_substitute`) keeps the whole (C, H, W) map.
Going down one convolution of kernel k, stride s, dilation d grows the window from K to
(K − 1)·s + d·(k − 1) + 1 (a transposed convolution of the window alone); the windows of all
neurons of one map sit on a regular grid whose step is the product of the strides below it.
Window positions that fall on a convolution's zero padding are dropped (their coefficients are set
to 0: the padding is 0 whatever the input).

- :func:`patches_supported` — whether the layers below a feature map are ones this engine takes
  (Conv2d with zero padding, BatchNorm in eval mode / Normalize, a relaxed activation, Identity or
  Dropout in eval mode, in a chain without residual joins); the others go to the dense engine.
- :func:`patch_preact_bounds` — lower and upper bounds of chosen neurons of a feature map,
  batched over points and over neurons, each coefficient tensor within a memory budget.

Activations are relaxed by :func:`ccdist_plugin.bounds.relaxations.activation_relaxation`, read
through its four per-neuron tensors only. Evaluation only: it runs without autograd.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ccdist_plugin.bounds.layers import PASSTHROUGH, GraphNode, apply_monotone, conv_pads, native_ibp_supports
from ccdist_plugin.bounds.relaxations import RELAXED_ACTIVATIONS, Relaxation, activation_relaxation
from ccdist_plugin.models import Normalize

__all__ = ["PATCH_BUDGET", "PatchBudgetError", "patches_supported", "patch_preact_bounds", "fill_open_signs"]

#: default most elements of one patches coefficient tensor (points × rows × C × kh × kw); 2**24 is
#: 128 MiB in float64, and a back-substitution holds a few tensors of that size at once
PATCH_BUDGET = 2**24


class PatchBudgetError(ValueError):
    """The memory budget cannot hold even one neuron's back-substitution (the message names it)."""


@dataclass(frozen=True)
class _Window:
    """Where the coefficient window of the neuron at (h, w) of the bounded map lies in a lower map:
    rows ``h·stride_h + offset_h`` to that plus ``kh − 1`` (likewise columns)."""

    kh: int
    kw: int
    stride_h: int
    stride_w: int
    offset_h: int
    offset_w: int

    def below(self, conv: nn.Conv2d) -> _Window:
        """The window on ``conv``'s input of a window on its output."""
        left, _, top, _ = conv_pads(conv)
        (sh, sw), (dh, dw), (kh, kw) = conv.stride, conv.dilation, conv.kernel_size
        return _Window(
            (self.kh - 1) * sh + dh * (kh - 1) + 1,
            (self.kw - 1) * sw + dw * (kw - 1) + 1,
            self.stride_h * sh,
            self.stride_w * sw,
            self.offset_h * sh - top,
            self.offset_w * sw - left,
        )


def _patch_layer(layer: nn.Module) -> bool:
    """A leaf layer this engine back-substitutes in patches form."""
    if not native_ibp_supports(layer):
        return False
    if isinstance(layer, nn.Conv2d):
        return layer.padding_mode == "zeros"
    if isinstance(layer, nn.modules.batchnorm._BatchNorm):
        return not layer.training  # train mode: batch statistics, kept on the dense path
    return isinstance(layer, (Normalize, *RELAXED_ACTIVATIONS, *PASSTHROUGH))


def patches_supported(nodes: list[GraphNode], src: int, shapes: list[torch.Size]) -> bool:
    """True when node ``src`` is a (C, H, W) feature map and every node below it is a one-input
    layer this engine takes (no residual join, every map three-dimensional)."""
    if len(shapes[src]) != 3:
        return False
    for n in range(1, src + 1):
        node = nodes[n]
        if node.layer is None or node.inputs != (n - 1,) or not _patch_layer(node.layer):
            return False
        if len(shapes[n - 1]) != 3:
            return False
    return True


def _windows(nodes: list[GraphNode], src: int) -> dict[int, _Window]:
    """The window of every node from ``src`` down to the input (node 0)."""
    out = {src: _Window(1, 1, 1, 1, 0, 0)}
    for n in range(src, 0, -1):
        layer = nodes[n].layer
        out[n - 1] = out[n].below(layer) if isinstance(layer, nn.Conv2d) else out[n]
    return out


def _padded(t: Tensor, win: _Window, grid: tuple[int, int]) -> tuple[Tensor, int, int]:
    """``t`` (B, C, H, W) zero-padded so that every window of the grid lies inside (windows reach
    into a convolution's padding), and the padded row and column of the first window's origin."""
    height, width = t.shape[-2:]
    pad_t, pad_l = max(0, -win.offset_h), max(0, -win.offset_w)
    pad_b = max(0, (grid[0] - 1) * win.stride_h + win.offset_h + win.kh - height)
    pad_r = max(0, (grid[1] - 1) * win.stride_w + win.offset_w + win.kw - width)
    return F.pad(t, (pad_l, pad_r, pad_t, pad_b)), win.offset_h + pad_t, win.offset_w + pad_l


def _gather(t: Tensor, win: _Window, h0: Tensor, w0: Tensor, grid: tuple[int, int]) -> Tensor:
    """The windows of map ``t`` (B, C, H, W) at rows ``h0``, ``w0`` (R,) of the bounded map,
    zero outside ``t``: (B, R, C, kh, kw) (a strided view)."""
    padded, top, left = _padded(t, win, grid)
    rows = (h0 * win.stride_h + top).unsqueeze(1) + torch.arange(win.kh, device=t.device)
    cols = (w0 * win.stride_w + left).unsqueeze(1) + torch.arange(win.kw, device=t.device)
    return padded[:, :, rows.unsqueeze(2), cols.unsqueeze(1)].transpose(1, 2)


def _all_windows(t: Tensor, win: _Window, grid: tuple[int, int]) -> Tensor:
    """The windows of map ``t`` (B, C, H, W) at every position of the grid, zero outside ``t``:
    (B, gh·gw, C·kh·kw), so that a chunk's windows are rows picked by ``index_select``."""
    padded, top, left = _padded(t, win, grid)
    padded = padded[..., top:, left:]
    cols = F.unfold(padded, (win.kh, win.kw), stride=(win.stride_h, win.stride_w))
    nh = (padded.shape[-2] - win.kh) // win.stride_h + 1
    nw = (padded.shape[-1] - win.kw) // win.stride_w + 1
    cols = cols.reshape(t.shape[0], -1, nh, nw)[..., : grid[0], : grid[1]]
    return cols.flatten(2).transpose(1, 2).contiguous()


def _inside(win: _Window, h0: Tensor, w0: Tensor, shape: torch.Size) -> Tensor | None:
    """(R, kh, kw) mask of the window positions inside a (C, H, W) map; None when all are."""
    rows = (h0 * win.stride_h + win.offset_h).unsqueeze(1) + torch.arange(win.kh, device=h0.device)
    cols = (w0 * win.stride_w + win.offset_w).unsqueeze(1) + torch.arange(win.kw, device=h0.device)
    ok_r = (rows >= 0) & (rows < shape[-2])
    ok_c = (cols >= 0) & (cols < shape[-1])
    if bool(ok_r.all()) and bool(ok_c.all()):
        return None
    return ok_r.unsqueeze(2) & ok_c.unsqueeze(1)


def _conv_adjoint(conv: nn.Conv2d, a: Tensor, win: _Window) -> Tensor:
    """Windows ``a`` (B, R, C_out, K, K′) on ``conv``'s output pulled back onto its input window
    ``win``: the transposed convolution of each window, without padding (the window grows)."""
    b, rows, c_out = a.shape[:3]
    flat = a.reshape(b * rows, c_out, -1)
    if conv.groups == 1:
        # one matrix product per window and a col2im (F.fold): in float64 on a CPU this is faster
        # than conv_transpose2d, which goes through a slow generic kernel there
        cols = torch.matmul(conv.weight.reshape(c_out, -1).t(), flat)
        out = F.fold(cols, (win.kh, win.kw), conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
    else:
        windows = flat.reshape(b * rows, *a.shape[2:])
        out = F.conv_transpose2d(windows, conv.weight, None, conv.stride, 0, 0, conv.groups, conv.dilation)
    return out.reshape(b, rows, *out.shape[1:])


class _Relaxed:
    """An activation's relaxation as one stacked map, so a chunk's windows come from one gather;
    with ``cache``, every window of the grid is extracted once (then a chunk's are picked by
    ``index_select``, far cheaper than gathering every row's window element by element)."""

    def __init__(self, r: Relaxation, win: _Window, grid: tuple[int, int], cache: bool):
        # the upper slope as its difference from the lower one: a′ = a·lower + min(a, 0)·(upper − lower)
        parts = [r.lower_slope, r.upper_slope - r.lower_slope]
        self.has_upper = r.upper_intercept is not None
        self.has_lower = r.lower_intercept is not None
        parts += [p for p in (r.upper_intercept, r.lower_intercept) if p is not None]
        self.channels = r.lower_slope.shape[1]
        self.stacked = torch.cat(parts, dim=1)
        self.win, self.grid = win, grid
        self.cached = _all_windows(self.stacked, win, grid) if cache else None

    def windows(self, h0: Tensor, w0: Tensor) -> Tensor:
        """(B, R, kC, kh, kw): the stacked relaxation's windows at rows ``h0``, ``w0``."""
        if self.cached is None:
            return _gather(self.stacked, self.win, h0, w0, self.grid)
        picked = self.cached.index_select(1, h0 * self.grid[1] + w0)
        return picked.reshape(*picked.shape[:2], -1, self.win.kh, self.win.kw)

    def apply(self, a: Tensor, bias: Tensor, h0: Tensor, w0: Tensor) -> tuple[Tensor, Tensor]:
        """``a · σ(z) + bias`` (a: (B or 1, R, C, kh, kw)) to a lower bound ``a′ · z + bias′``:
        the lower line where a coefficient is non-negative, the upper line where it is negative."""
        w = self.windows(h0, w0)
        c = self.channels
        negative = a.clamp(max=0)
        nxt = 2 * c
        if self.has_upper:
            bias = bias + (negative * w[:, :, nxt : nxt + c]).sum((2, 3, 4))
            nxt += c
        if self.has_lower:
            bias = bias + ((a - negative) * w[:, :, nxt : nxt + c]).sum((2, 3, 4))
        return (a * w[:, :, :c]).addcmul_(negative, w[:, :, c : 2 * c]), bias


def _back_substitute(
    nodes: list[GraphNode],
    src: int,
    shapes: list[torch.Size],
    relaxed: dict[int, _Relaxed],
    affine: dict[int, tuple[Tensor, Tensor]],
    windows: dict[int, _Window],
    box: tuple[Tensor, Tensor],
    neurons: Tensor,
    stop: int = 0,
) -> tuple[Tensor, Tensor]:
    """Lower and upper bounds (B, n) of the ``neurons`` (flat indices) of node ``src``, by
    back-substitution down to node ``stop``, where ``box`` bounds the values (node 0: the input)."""
    chans, height, width = shapes[src]
    grid = (height, width)
    c0, h0, w0 = neurons // (height * width), (neurons // width) % height, neurons % width
    n = neurons.numel()
    # rows 0..n-1 bound +z (its lower bound), rows n..2n-1 bound −z (minus its upper bound)
    h0, w0, c0 = h0.repeat(2), w0.repeat(2), c0.repeat(2)
    dtype, device = box[0].dtype, box[0].device
    a = torch.zeros(1, 2 * n, chans, 1, 1, dtype=dtype, device=device)
    sign = torch.ones(2 * n, dtype=dtype, device=device)
    sign[n:] = -1.0
    a[0, torch.arange(2 * n, device=device), c0, 0, 0] = sign
    bias = torch.zeros(1, 2 * n, dtype=dtype, device=device)
    for node_id in range(src, stop, -1):
        layer, below = nodes[node_id].layer, node_id - 1
        if isinstance(layer, nn.Conv2d):
            if layer.bias is not None:
                bias = bias + torch.einsum("brc,c->br", a.sum((3, 4)), layer.bias)
            a = _conv_adjoint(layer, a, windows[below])
            mask = _inside(windows[below], h0, w0, shapes[below])
            if mask is not None:  # positions on the zero padding: no input there
                a = a * mask.unsqueeze(1).to(dtype)
        elif isinstance(layer, (nn.modules.batchnorm._BatchNorm, Normalize)):
            scale, shift = affine[node_id]
            bias = bias + a.sum((3, 4)) @ shift.reshape(-1)
            a = a * scale.reshape(1, 1, -1, 1, 1)
        elif isinstance(layer, RELAXED_ACTIVATIONS):
            a, bias = relaxed[node_id].apply(a, bias, h0, w0)
        # else: Identity / Dropout in eval mode pass the coefficients on
    lo, hi = box
    centre = _gather((hi + lo) / 2, windows[stop], h0, w0, grid)
    radius = _gather((hi - lo) / 2, windows[stop], h0, w0, grid)
    lower = (a * centre).sum((2, 3, 4)) - (a.abs() * radius).sum((2, 3, 4)) + bias
    return lower[:, :n], -lower[:, n:]


def _sliced(r: Relaxation, sl: slice) -> Relaxation:
    """The relaxation of the points ``sl``."""
    return Relaxation(
        r.lower_slope[sl],
        None if r.lower_intercept is None else r.lower_intercept[sl],
        r.upper_slope[sl],
        None if r.upper_intercept is None else r.upper_intercept[sl],
    )


def _chunks(
    shapes: list[torch.Size],
    windows: dict[int, _Window],
    relaxations: dict[int, Relaxation],
    grid: tuple[int, int],
    bsz: int,
    budget: int,
) -> tuple[bool, int, int]:
    """Whether every relaxation window is extracted once (the cache fits the budget), the points
    and the neurons per back-substitution, so that one coefficient tensor stays within ``budget``."""
    per_row = max(shapes[n][0] * w.kh * w.kw for n, w in windows.items())
    need = 2 * per_row  # one neuron: its lower and its upper row
    if budget < need:
        raise PatchBudgetError(
            f"memory budget of {budget} elements is too small for one neuron's back-substitution on "
            f"this network (it needs {need}: 2 rows × {per_row} window coefficients); raise the budget "
            "(patch_budget) or use conv_mode='dense'"
        )
    # every window of every relaxation, per point (what the cache holds)
    cache_per_point = sum(
        (2 + (r.upper_intercept is not None) + (r.lower_intercept is not None))
        * shapes[n - 1][0]
        * windows[n - 1].kh
        * windows[n - 1].kw
        * grid[0]
        * grid[1]
        for n, r in relaxations.items()
    )
    cache = cache_per_point <= budget
    points = max(1, min(bsz, budget // need, budget // max(1, cache_per_point) if cache else bsz))
    return cache, points, max(1, budget // (need * points))


def fill_open_signs(
    low: Tensor, up: Tensor, full: Callable[[Tensor], tuple[Tensor, Tensor]], wanted: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The cheap pass's bounds (B, n) completed: where they leave a neuron's sign open in an example
    (and ``wanted`` holds there), that example takes the full back-substitution's bounds,
    ``full(columns)`` for the columns where some example needs it. Per example, so a point keeps the
    cheap bounds of a neuron they prove stable there whatever its batch. Fills ``low``/``up`` in place."""
    rest = (low < 0) & (up > 0)
    if wanted is not None:
        rest &= wanted
    cols = rest.any(0)
    if bool(cols.any()):
        full_low, full_up = full(cols)
        rest = rest[:, cols]
        low[:, cols] = torch.where(rest, full_low, low[:, cols])
        up[:, cols] = torch.where(rest, full_up, up[:, cols])
    return low, up


@torch.no_grad()  # evaluation only: the dense engine is the differentiable one (CROWN-IBP training)
def patch_preact_bounds(
    nodes: list[GraphNode],
    src: int,
    shapes: list[torch.Size],
    preact: dict[int, tuple[Tensor, Tensor]],
    affine: dict[int, tuple[Tensor, Tensor]],
    lo: Tensor,
    hi: Tensor,
    neurons: Tensor,
    budget: int = PATCH_BUDGET,
    skip_stable: bool = False,
) -> tuple[Tensor, Tensor]:
    """CROWN lower and upper bounds (B, n) on the ``neurons`` (flat indices into node ``src``'s
    (C, H, W) map) over the input box [lo, hi], by back-substitution in patches form.

    ``nodes``/``shapes`` are the network's graph and node shapes (node 0: the input), ``preact[n]``
    the bounds of the input of activation node n, ``affine[n]`` the (scale, shift) of a BatchNorm /
    Normalize node n; :func:`patches_supported` must hold for ``src``. Points and neurons are
    processed in chunks so that one coefficient tensor (points × 2·neurons × C × kh × kw, the
    largest window below ``src``) holds at most ``budget`` elements (default
    :data:`PATCH_BUDGET` = 2**24); a back-substitution holds a few tensors of that size at once.

    ``skip_stable`` (for a map feeding a ReLU, whose relaxation is exact on a neuron of one sign
    whatever its bounds): neurons that a back-substitution down to the second activation below
    alone proves of one sign in a point get those bounds in that point, and only the rest the full
    back-substitution to the input (each point's bounds are its own, whatever its batch).

    Raises:
        PatchBudgetError: ``budget`` is below what one neuron of one point needs.
    """
    windows = _windows(nodes, src)
    relaxations = {
        n: activation_relaxation(nodes[n].layer, *preact[n])
        for n in range(1, src + 1)
        if isinstance(nodes[n].layer, RELAXED_ACTIVATIONS)
    }
    grid = (shapes[src][1], shapes[src][2])
    cache, points, per_pass = _chunks(shapes, windows, relaxations, grid, lo.shape[0], budget)
    acts = [n for n in range(src, 0, -1) if isinstance(nodes[n].layer, RELAXED_ACTIVATIONS)]
    stop = acts[1] if skip_stable and len(acts) > 1 else None
    lower_parts, upper_parts = [], []
    for p in range(0, lo.shape[0], points):
        sl = slice(p, p + points)
        relaxed = {n: _Relaxed(_sliced(r, sl), windows[n - 1], grid, cache) for n, r in relaxations.items()}

        def bounds(
            todo: Tensor, stop: int, box: tuple[Tensor, Tensor], relaxed=relaxed
        ) -> tuple[Tensor, Tensor]:
            if not todo.numel():
                empty = box[0].new_zeros(box[0].shape[0], 0)
                return empty, empty
            parts = [
                _back_substitute(
                    nodes, src, shapes, relaxed, affine, windows, box, todo[s : s + per_pass], stop
                )
                for s in range(0, todo.numel(), per_pass)
            ]
            return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)

        if stop is None:
            low, up = bounds(neurons, 0, (lo[sl], hi[sl]))
        else:
            # first down to the second activation below only, bounding its output by the interval
            # its pre-activation bounds give: cheap (small windows), and every neuron that this
            # proves stable is done (a stable ReLU's relaxation is exact, whatever its bounds)
            act = nodes[stop].layer
            pl, pu = preact[stop]
            low, up = bounds(neurons, stop, (apply_monotone(act, pl[sl]), apply_monotone(act, pu[sl])))
            low, up = fill_open_signs(low, up, lambda cols, sl=sl: bounds(neurons[cols], 0, (lo[sl], hi[sl])))
        lower_parts.append(low)
        upper_parts.append(up)
    return torch.cat(lower_parts), torch.cat(upper_parts)
