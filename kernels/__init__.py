"""Triton kernels (installed as ``fastadapt.kernels``). Importing a module here imports Triton:
the op layer imports them lazily, so ``import fastadapt`` works where Triton does not."""
