"""Where the Triton backend runs the frozen products of DoRA and QLoRA: in our own Triton GEMM with
the op's extra work in its K loop (``gemm``), or in cuBLAS with that work as a separate pass.

Each choice is a rule on the number of rows M of the call (tokens), the same in the forward and
the backward, with the crossover and its source declared here once. Both strategies of an op save
the same tensors for the backward, so a backward may run the other one (an environment variable
changed in between) and still be right. The rules are plain Python (no Triton import), so that
dispatch can show them without loading the kernels: ``fastadapt.dispatch.explain`` gives the
strategy a call would run, ``fastadapt info`` the rules.

Crossover estimates, for one H100-class GPU (HBM ~3.3 TB/s; DESIGN.md's H100 run: a plain Triton
GEMM at 518 TFLOP/s where cuBLAS did 709) at 4096 x 4096, bf16, r = 16; per row of M, a GEMM in our
Triton kernel loses 2NK (1/518T - 1/709T) = 0.0175 us against cuBLAS. Both sides of each balance
grow with N x K, so to first order the crossover is a number of rows whatever the layer's size:

* DoRA: the separate path reads W once more for the norm (32 MiB, ~10 us) and writes and reads the
  M x N product once more in the forward (~0.005 us a row) and g * gy and gx in the backward
  (~0.010 us a row); the GEMM path loses 0.0175 us a row in each of its two GEMMs and does the
  norm's r / BLOCK_M extra MMA work in the forward (1/8 with 128-row tiles, ~0.008 us a row).
  Break-even: ~360 rows forward + backward, ~500 forward alone.
* QLoRA / FP8: dequantizing once writes the bf16 weight and cuBLAS reads it back (4 bytes an
  element, 64 MiB, ~20 us per product); the in-GEMM path loses the Triton GEMM's 0.0175 us a row,
  or ~0.08 us if dequantizing in the K loop halves its tensor-core rate: break-even between ~240
  and ~1140 rows. Three public reports found dequantize-once + cuBLAS faster at training token
  counts: unsloth #39 (fused GPTQ dequant + matmul slower; the maintainer moved to a split
  dequant -> matmul), axolotl #3743 (NVFP4 dequant in a grouped GEMM's K loop "starves the tensor
  cores", dequant-once 10.5x faster fwd+bwd on a B200), bitsandbytes #1319 (a separate
  dequantization costs 30-50 % of the matmul).

Both crossovers are set at 512 rows, inside these ranges; ``fastadapt bench --op dora --op qlora``
times both strategies at M = 1, 16, 256, 2048, 8192 so that the first GPU run can replace them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

AUTO = "auto"


@dataclass(frozen=True)
class FrozenProductRule:
    """``split`` from ``min_rows`` rows of M up, else ``fused``; ``env`` = ``fused`` / ``split`` forces
    one, ``auto`` (or unset) applies the rule. Calling it with an op's dispatch inputs (its rows
    are ``x``'s) gives the choice and why, for ``dispatch.explain``; ``str()`` gives the rule."""

    env: str
    fused: str
    split: str
    min_rows: int
    fused_runs: str  # what each choice runs, for the rule's text
    split_runs: str
    source: str      # where the crossover comes from

    def forced(self) -> str | None:
        value = os.environ.get(self.env, AUTO) or AUTO
        if value not in (AUTO, self.fused, self.split):
            raise ValueError(f"{self.env}={value!r}: expected {self.fused!r}, {self.split!r} or {AUTO!r}")
        return None if value == AUTO else value

    def automatic(self, rows: int) -> str:
        """The rule's strategy for ``rows`` rows (M), whatever the environment says."""
        return self.split if rows >= self.min_rows else self.fused

    def choose(self, rows: int) -> str:
        """The strategy a call over ``rows`` rows (M) runs: the forced one, else the rule's."""
        return self.forced() or self.automatic(rows)

    def __call__(self, x, **_) -> str:
        rows = x.shape[:-1].numel()
        choice = self.choose(rows)
        if self.forced() is not None:
            return f"{choice} (forced by {self.env})"
        return f"{choice} (M={rows} {'>=' if choice == self.split else '<'} {self.min_rows} rows)"

    def __str__(self) -> str:
        return (f"{self.split} ({self.split_runs}) from M >= {self.min_rows} rows, else {self.fused} "
                f"({self.fused_runs}); {self.env}={self.fused}|{self.split} forces one; {self.source}")


_ESTIMATE = "crossover estimated, not measured on this device (fastadapt/strategy.py)"

DORA_NORM = FrozenProductRule(
    env="FASTADAPT_DORA_NORM", fused="gemm", split="separate", min_rows=512,
    split_runs="cuBLAS frozen products, the norm from a one-pass kernel over W",
    fused_runs="the norm in our Triton GEMM's K loop, W read once",
    source=_ESTIMATE + " from DESIGN.md's H100 GEMM rates (Triton 518, cuBLAS 709 TFLOP/s)")

QLORA_DEQUANT = FrozenProductRule(
    env="FASTADAPT_QLORA_DEQUANT", fused="gemm", split="once", min_rows=512,
    split_runs="the weight dequantized once into a compute-dtype buffer, then lora_linear's cuBLAS products",
    fused_runs="dequantized tile by tile in our Triton GEMM's K loop, the 4/8-bit codes read once",
    source=_ESTIMATE + " from public reports (unsloth #39, axolotl #3743, bitsandbytes #1319)")


def grouped_mm_reason(*operands) -> str | None:
    """Why ``torch._grouped_mm`` cannot take these operands (None: it can), by the checks of its
    meta function (torch/_meta_registrations.py, ``_meta_grouped_mm_common``): bfloat16 only on
    CUDA (compute capability 8.0 and up), float32 / bfloat16 / float16 on the CPU, and each 2-D or 3-D
    operand unit-strided in one of its last two dimensions with the other stride a multiple of 16
    bytes; plus 16-byte aligned data (transformers' ``_can_use_grouped_mm`` checks it too)."""
    import torch

    first = operands[0]
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if first.device.type == "cuda":
        if first.dtype != torch.bfloat16:
            return f"torch._grouped_mm takes bfloat16 on CUDA, not {first.dtype}"
        if torch.cuda.get_device_capability(first.device) < (8, 0):
            return "torch._grouped_mm needs compute capability 8.0 or newer"
    elif first.device.type != "cpu" or first.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"torch._grouped_mm does not take {first.dtype} on {first.device.type}"
    for t in operands:
        align = 16 // t.element_size()
        (rows, cols), (row_stride, col_stride) = t.shape[-2:], t.stride()[-2:]
        if row_stride == 1 and col_stride >= max(1, rows):
            lead = col_stride
        elif col_stride == 1 and row_stride >= max(1, cols):
            lead = row_stride
        else:
            return f"an operand of shape {tuple(t.shape)} has strides {t.stride()}: neither dimension is unit-strided"
        if lead % align or t.data_ptr() % 16:
            return f"an operand of shape {tuple(t.shape)}, strides {t.stride()}, is not 16-byte aligned"
    return None


@dataclass(frozen=True)
class GroupedProductRule:
    """Where the Triton backend of ``moe_lora_experts`` runs the experts' frozen products:
    ``torch._grouped_mm`` (cuBLAS / CUTLASS grouped GEMM on CUDA) wherever it takes the operands,
    else our Triton grouped GEMM (any dtype and strides); ``FASTADAPT_MOE_GEMM`` forces one. The
    LoRA terms run in Triton around either (kernels/moe_lora.py)."""

    env: str = "FASTADAPT_MOE_GEMM"
    choices: tuple = ("grouped_mm", "triton")

    def forced(self) -> str | None:
        value = os.environ.get(self.env, AUTO) or AUTO
        if value not in (AUTO, *self.choices):
            raise ValueError(f"{self.env}={value!r}: expected {self.choices[0]!r}, {self.choices[1]!r} or {AUTO!r}")
        return None if value == AUTO else value

    def choose(self, *operands) -> str:
        """The choice for one product's operands (a 2-D input, the experts' 3-D weight view)."""
        reason = grouped_mm_reason(*operands)
        forced = self.forced()
        if forced == "grouped_mm" and reason is not None:
            raise ValueError(f"{self.env}=grouped_mm, but {reason}")
        return forced or ("triton" if reason else "grouped_mm")

    def __call__(self, x, gate_up_proj, down_proj, **_) -> str:
        # The products' 2-D inputs are the op's own contiguous buffers: (., H), (., 2I), (., I) rows.
        import torch

        rows = [torch.empty(0, n, device=x.device, dtype=x.dtype) for n in (x.shape[1], down_proj.shape[2])]
        reason = grouped_mm_reason(rows[0], gate_up_proj, rows[1], down_proj)
        if self.forced() is not None:
            return f"{self.forced()} (forced by {self.env})"
        return "grouped_mm" if reason is None else f"triton ({reason})"

    def __str__(self) -> str:
        return (f"torch._grouped_mm for the frozen expert products wherever it takes them, else a Triton grouped "
                f"GEMM; the LoRA terms in Triton around them; {self.env}=grouped_mm|triton forces one; cuBLAS-first "
                "(DESIGN.md: cuBLAS 709 against a plain Triton GEMM's 518 TFLOP/s on an H100), not measured on MoE "
                "shapes")


MOE_GEMM = GroupedProductRule()
