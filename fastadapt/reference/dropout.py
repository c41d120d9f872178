"""The reference backend's dropout mask, shared by every op that has dropout."""

from __future__ import annotations

import torch


def dropout_keep(seed: int, shape, p: float, device) -> torch.Tensor | None:
    """The reference backend's dropout mask (True = kept), regenerated from ``seed`` on demand."""
    if p == 0.0:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.rand(shape, generator=gen, device=device) >= p
