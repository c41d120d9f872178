"""LoRA on a quantized frozen base (NF4 QLoRA, FP8) in plain PyTorch: the oracle and the last fallback.

Both formats are one layout here, a table lookup times a blockwise scale over the weight's flat
(row-major) index ``i`` of its (N, K) shape::

    W.flat[i] = code[q_i] * absmax[i // blocksize]          (fp32 product, then rounded to the compute dtype)

* NF4 (bitsandbytes ``Params4bit`` / ``QuantState``, quant_type "nf4"): ``q_i`` is 4 bits, two per
  byte, element ``2j`` in the high nibble of byte ``j``; ``code`` is the 16-entry NF4 table
  (``QuantState.code``); ``absmax`` is fp32, one per ``blocksize`` elements (64 by default). With
  bnb's double quantization (``compress_statistics``, ``QuantState.nested``) ``absmax`` is itself
  uint8: ``absmax[b] = code2[absmax_q[b]] * absmax2[b // blocksize2] + offset`` in fp32 (bnb's
  ``dequantize_blockwise`` then ``+= offset``), ``code2`` the 256-entry dynamic map
  (``state2.code``), ``absmax2`` = ``state2.absmax``, ``blocksize2`` = ``state2.blocksize`` (256).
  This is the layout of bnb's CUDA kernels and of its "default" backend
  (``_dequantize_4bit_compute``). bnb 0.50.2's native CPU kernel instead reads the absmax of (n, k)
  at ``n * (K // blocksize) + k // blocksize`` and so disagrees with its own quantizer when K is
  not a multiple of the blocksize (measured: relative error 0.28 instead of NF4's 0.09 at 48x80);
  we follow the flat layout.
* FP8 (``torch.float8_e4m3fn``): ``q_i`` is the weight's byte, ``code`` the 256 e4m3 values, and
  ``absmax`` the scale that multiplies it back (transformers' ``weight_scale_inv``; torchao's
  ``Float8Tensor.scale``): one value per tensor (blocksize N*K) or one per output channel
  (blocksize K).

The LoRA math on the dequantized weight is :mod:`fastadapt.reference.lora`'s.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from fastadapt.reference import lora

# bitsandbytes' NF4 table (bitsandbytes.functional.get_4bit_type("nf4"), from the QLoRA paper):
# the quantiles of N(0, 1) normalized to [-1, 1], with an exact zero.
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def nf4_code(device=None) -> torch.Tensor:
    """The 16 NF4 values as float32 (equal to bnb's ``QuantState.code`` for "nf4")."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def fp8_code(device=None) -> torch.Tensor:
    """The 256 values of ``torch.float8_e4m3fn`` as float32, indexed by the byte."""
    return torch.arange(256, dtype=torch.int32, device=device).to(torch.uint8).view(torch.float8_e4m3fn).float()


class QuantizedWeight(NamedTuple):
    """A frozen (N, K) weight in the layout above. ``data`` is uint8 (bnb's packed bytes, or an
    e4m3 weight viewed as bytes), ``code`` the float32 value table (16 or 256 entries), ``absmax``
    float32 per block (uint8 when double-quantized, with ``absmax2`` / ``code2`` / ``offset``)."""

    data: torch.Tensor
    code: torch.Tensor
    absmax: torch.Tensor
    absmax2: Optional[torch.Tensor]
    code2: Optional[torch.Tensor]
    offset: Optional[torch.Tensor]
    blocksize: int
    blocksize2: int
    bits: int
    shape: tuple[int, int]

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None


def block_scales(q: QuantizedWeight) -> torch.Tensor:
    """The fp32 scale of every block: ``absmax`` itself, or bnb's double-quantized absmax decoded."""
    if not q.nested:
        return q.absmax.float()
    blocks = torch.arange(q.absmax.numel(), device=q.absmax.device) // q.blocksize2
    return q.code2[q.absmax.long()] * q.absmax2[blocks] + q.offset


def dequantize(q: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The (N, K) weight in ``dtype``, exactly as bitsandbytes dequantizes NF4 (or as
    ``w.float() * scale`` for FP8): the fp32 product rounded once to ``dtype``."""
    n = q.shape[0] * q.shape[1]
    data = q.data.reshape(-1)
    if q.bits == 4:
        codes = torch.stack([data >> 4, data & 0xF], dim=1).reshape(-1)[:n]
    else:
        codes = data[:n]
    blocks = torch.arange(n, device=data.device) // q.blocksize
    return (q.code[codes.long()] * block_scales(q)[blocks]).reshape(q.shape).to(dtype)


def random_weight(fmt: str, n_out: int, n_in: int, device=None, blocksize: int = 64) -> QuantizedWeight:
    """A random quantized (n_out, n_in) weight with rows of norm about 1 and every code used, built
    without a quantizer (for tests and benchmarks): ``fmt`` is "nf4", "nf4-nested" (bnb's double
    quantization), "fp8-tensor" or "fp8-channel" (the scale's granularity)."""
    numel = n_out * n_in
    if fmt.startswith("fp8"):
        data = torch.randint(0, 256, (n_out, n_in), dtype=torch.uint8, device=device)
        data[(data & 0x7F) == 0x7F] = 0x38  # e4m3fn's NaN codes -> 1.0
        scale = torch.rand(1 if fmt == "fp8-tensor" else n_out, device=device) / (4 * n_in**0.5) + 0.01
        blocksize = numel if fmt == "fp8-tensor" else n_in
        return QuantizedWeight(data.reshape(-1), fp8_code(device), scale, None, None, None, blocksize, 256, 8,
                               (n_out, n_in))
    if fmt not in ("nf4", "nf4-nested"):
        raise ValueError(f"unknown format {fmt!r}")
    data = torch.randint(0, 256, ((numel + 1) // 2,), dtype=torch.uint8, device=device)
    blocks = -(-numel // blocksize)
    if fmt == "nf4":
        absmax = torch.rand(blocks, device=device) * 2 / n_in**0.5 + 0.1 / n_in**0.5
        return QuantizedWeight(data, nf4_code(device), absmax, None, None, None, blocksize, 256, 4, (n_out, n_in))
    code2 = torch.randn(256, device=device).sort().values / 3
    return QuantizedWeight(data, nf4_code(device), torch.randint(0, 256, (blocks,), dtype=torch.uint8, device=device),
                           torch.rand(-(-blocks // 256), device=device) / n_in**0.5, code2,
                           torch.tensor(1.5 / n_in**0.5, device=device), blocksize, 256, 4, (n_out, n_in))


def forward(x2d, qweight, lora_A, lora_B, scaling, bias, dropout_p, seed, ranks=None, ranks_p=None):
    """Backend forward: (y, u) for 2-D ``x2d`` and a :class:`QuantizedWeight`."""
    weight = dequantize(qweight, x2d.dtype)
    return lora.forward(x2d, weight, lora_A, lora_B, scaling, bias, dropout_p, seed, ranks, ranks_p)


def backward(gy, x2d, qweight, lora_A, lora_B, u, scaling, dropout_p, seed, needs, ranks=None, ranks_p=None):
    """Backend backward: (gx, gA, gB, gbias); the frozen quantized weight has no gradient."""
    weight = dequantize(qweight, x2d.dtype)
    return lora.backward(gy, x2d, weight, lora_A, lora_B, u, scaling, dropout_p, seed, (*needs, False), ranks,
                         ranks_p)[:4]
