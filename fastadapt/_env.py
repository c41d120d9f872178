"""The process setup of fastadapt's own entry points (the ``fastadapt`` command, the test suite), and
the versions they report."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

# A checkout's root holds the Triton kernels as the folder kernels/ (installed as fastadapt.kernels).
_ROOT = Path(__file__).resolve().parent.parent
# The libraries whose import-time and call-time chatter the command keeps off its output.
THIRD_PARTY = ("transformers", "peft", "accelerate", "bitsandbytes", "torch", "triton")


def _is_root(entry: str) -> bool:
    return Path(entry or os.curdir).resolve() == _ROOT


def hide_checkout_root() -> None:
    """Take a checkout's root off ``sys.path`` and ``PYTHONPATH`` (child processes), where ``python
    -m`` / ``python -c`` run in it and pytest-xdist put it: there its kernels/ folder would be found
    as the top-level package ``kernels``, which is Hugging Face's kernel hub (transformers and
    bitsandbytes import it). fastadapt itself is found by its installation, editable or not."""
    if not (_ROOT / "kernels" / "__init__.py").is_file():
        return  # an installed fastadapt: its parent is site-packages
    sys.path[:] = [p for p in sys.path if not _is_root(p)]
    if "PYTHONPATH" in os.environ:
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in os.environ["PYTHONPATH"].split(os.pathsep)
                                                   if p and not _is_root(p))


def quiet_third_party() -> None:
    """Keep the libraries' warnings and log lines (deprecations, optional-kernel notices) off the
    command's output; fastadapt's own warnings (they start with ``fastadapt``) still show."""
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", message="fastadapt")
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def versions() -> dict[str, str]:
    """The installed versions of fastadapt and the libraries its results depend on."""
    import importlib.metadata as md

    out = {}
    for pkg in ("fastadapt", "torch", "triton", "peft", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out
