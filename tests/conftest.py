"""Test setup: without CUDA the Triton kernels run in Triton's CPU interpreter, which must be
switched on before triton is first imported (fastadapt itself imports it lazily)."""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastadapt import _env  # noqa: E402

# python -m pytest and pytest-xdist put the checkout's root on sys.path (and PYTHONPATH, for the
# processes the tests start), where kernels/ would pass for Hugging Face's `kernels` package.
_env.hide_checkout_root()

# The test tensors are tiny: intra-op threads only contend for CI's two cores (the bottleneck
# tests' reference half ran 3x faster on one thread).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different seed per test (fresh random inputs), reproducible from the test id (crc32, not
    # hash(): str hashes change from one process to the next).
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
