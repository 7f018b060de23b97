"""Training-time augmentation (docs/method.md, "Data"): random crop with padding and horizontal flip,
per batch."""

from __future__ import annotations

import torch

__all__ = ["augment_batch"]


def augment_batch(
    x: torch.Tensor,
    pad: int,
    flip: bool,
    generator: torch.Generator | None = None,
    padding_mode: str = "replicate",
) -> torch.Tensor:
    """Randomly crop (after padding by ``pad``) and optionally flip every image of a batch.

    Equivalent to ``RandomCrop(H, padding=pad, padding_mode=...)`` followed by ``RandomHorizontalFlip()``
    applied independently to each image, done as one ``gather`` on the whole batch: output pixel (i, j)
    of image b reads input pixel (dy_b - pad + i, dx_b - pad + j') with j' = j or W - 1 - j, where
    out-of-range coordinates are clamped (``"replicate"``, edge padding) or give 0 (``"constant"``).

    Args:
        x: images (B, C, H, W), any dtype (uint8 or float), any device.
        pad: padding in pixels; offsets dy, dx are uniform in [0, 2 * pad]. 0 disables the crop.
        flip: flip each image horizontally with probability 1/2.
        generator: CPU ``torch.Generator`` driving all random draws (per image: dy, dx, then flip).
        padding_mode: ``"replicate"`` or ``"constant"``.

    Returns:
        a new tensor like ``x`` (same shape, dtype and device); pixel values are a subset of the input's
        (plus 0 for constant padding), so [0, 1] inputs stay in [0, 1].
    """
    if x.dim() != 4:
        raise ValueError(f"augment_batch: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if pad < 0:
        raise ValueError(f"augment_batch: pad must be >= 0, got {pad}")
    if padding_mode not in ("replicate", "constant"):
        raise ValueError(
            f"augment_batch: padding_mode must be 'replicate' or 'constant', got {padding_mode!r}"
        )
    batch, channels, height, width = x.shape
    if batch == 0 or (pad == 0 and not flip):
        return x.clone()
    rows = torch.arange(height).expand(batch, height)
    cols = torch.arange(width).expand(batch, width)
    if pad > 0:
        dy = torch.randint(0, 2 * pad + 1, (batch, 1), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (batch, 1), generator=generator)
        rows = rows + dy - pad
        cols = cols + dx - pad
    if flip:
        flipped = torch.rand(batch, 1, generator=generator) < 0.5
        cols = torch.where(flipped, cols.flip(1), cols)
    inside = ((rows >= 0) & (rows < height)).unsqueeze(2) & ((cols >= 0) & (cols < width)).unsqueeze(1)
    flat = rows.clamp(0, height - 1).unsqueeze(2) * width + cols.clamp(0, width - 1).unsqueeze(1)
    flat = flat.reshape(batch, 1, height * width).expand(batch, channels, height * width).to(x.device)
    out = x.reshape(batch, channels, height * width).gather(2, flat).view(batch, channels, height, width)
    if padding_mode == "constant" and pad > 0:
        out = out * inside.unsqueeze(1).to(device=x.device, dtype=out.dtype)
    return out
