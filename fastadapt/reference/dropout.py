"""The reference backend's dropout mask, shared by every op that has dropout."""

from __future__ import annotations

import torch


def dropout_keep(seed: int, shape, p, device) -> torch.Tensor | None:
    """The reference backend's dropout mask (True = kept), regenerated from ``seed`` on demand.

    ``p`` is a float, None (no dropout) or a tensor broadcast against ``shape`` (a probability per
    row, as in :mod:`fastadapt.reference.multi_lora`): the uniform draw is the same whatever ``p``
    is, so a row's mask depends only on the seed and its own probability.
    """
    if p is None or (not isinstance(p, torch.Tensor) and p == 0.0):
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.rand(shape, generator=gen, device=device) >= p
