"""Adapter parameters of models sharded by FSDP2 (``fully_shard``: DTensor parameters) or by
DeepSpeed ZeRO-3 (partitioned parameters, empty outside the forward): gathering them for a
checkpoint, loading a full checkpoint into them, and refusing to add adapters to a model that is
already wrapped (the engine would not know the new parameters: they would train unsharded and
unreduced, each rank its own copy).

Gathering is collective: every rank calls, as for any sharded state dict; rank 0 writes the file.
"""

from __future__ import annotations

import contextlib

import torch


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch.distributed not built
        return ()
    return DTensor


def is_dtensor(t) -> bool:
    return isinstance(t, _dtensor_type())


def is_zero3(t) -> bool:
    """A parameter partitioned by DeepSpeed ZeRO-3 (it carries a ``ds_id``)."""
    return hasattr(t, "ds_id")


def sharded(*tensors) -> bool:
    """Whether any of ``tensors`` is an FSDP2 shard or a ZeRO-3 partition: outside the forward such a
    parameter is not the module's weight (a DTensor shard, or an empty tensor), so code that runs
    there (``repr``, ``backend()``) must not read it as one."""
    return any(is_dtensor(t) or is_zero3(t) for t in tensors if t is not None)


def full_shape(p: torch.Tensor) -> torch.Size:
    """The unsharded shape (a DTensor's shape is already the global one)."""
    return p.ds_shape if is_zero3(p) else p.shape


@contextlib.contextmanager
def _zero3_gathered(params, modifier_rank=None):
    partitioned = [p for p in params if is_zero3(p)]
    if not partitioned:
        yield
        return
    import deepspeed
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank):
        yield


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full, contiguous, detached copies of ``tensors`` (parameters, not ``state_dict()`` values:
    those of ZeRO-3 are already empty). Collective when any of them is sharded."""
    out = {}
    with _zero3_gathered(tensors.values()):
        for name, t in tensors.items():
            t = t.detach()
            if is_dtensor(t):
                t = t.full_tensor()
            out[name] = t.contiguous().clone()
    return out


def writes_files() -> bool:
    """Whether this process writes checkpoints: the only one, or rank 0 of the process group."""
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@torch.no_grad()
def copy_full(params: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> None:
    """``params[k].copy_(values[k])`` with full ``values``: an FSDP2 parameter takes its own shard
    (sliced on each rank, no communication), a ZeRO-3 parameter is gathered, written, re-partitioned."""
    with _zero3_gathered(params.values(), modifier_rank=0):
        for name, value in values.items():
            param = params[name]
            if is_dtensor(param):
                from torch.distributed.tensor import distribute_tensor
                value = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements,
                                          src_data_rank=None)
            param.copy_(value)


def check_not_wrapped(model: torch.nn.Module, what: str) -> None:
    """Raise if ``model`` is already wrapped by DDP, FSDP2 or DeepSpeed: ``what`` adds parameters,
    which the engine, set up before, would neither shard nor reduce."""
    from torch.nn.parallel import DistributedDataParallel
    if isinstance(model, DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine" or any(
            is_dtensor(p) or is_zero3(p) for p in model.parameters()):
        raise RuntimeError(
            f"{what} must run before the model is wrapped for distributed training (DDP, FSDP2 fully_shard, "
            f"DeepSpeed ZeRO-3, accelerate.prepare, the HF Trainer): the engine would not shard or reduce the "
            f"new parameters. Add the adapters first, then wrap.")
