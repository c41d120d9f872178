"""Patched models under DDP, FSDP2 (``fully_shard``) and DeepSpeed ZeRO-3: real 2-rank jobs on the
CPU (gloo), checked against single-process runs on the full batch.

Each test spawns one job of 2 ranks (tests/distributed_jobs.py) that runs several scenarios in
turn: a tiny random Llama with PEFT LoRA patched by ``fastadapt.patch``, with bottleneck adapters
(``fastadapt.add_adapter``) and with LLaMA-Adapter (``fastadapt.add_adaption_prompt``). For each
scenario the test checks, at every one of several SGD steps, the mean loss and every adapter
gradient after the engine's reduction against the library's own single-process computation on the
full batch; that the forced fused backend served every call (dispatch spied on in the ranks, and
the unfused fallbacks counted: none may run); and that each checkpoint written by the ranks
reloads into a single-process model that gives the ranks' probe logits exactly.

The ranks run the ``cpp`` backend (the Triton interpreter would take minutes for these models);
one small DDP scenario runs the Triton kernels under the interpreter.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.multiprocessing as mp
from harness import assert_close, rel_err

import distributed_jobs as jobs
import fastadapt
from fastadapt import dispatch, llama_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available in this torch build",
                allow_module_level=True)

JOB_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def cpp_backend():
    # Built (or loaded from the cache) here, once, rather than by both ranks at the same time.
    from fastadapt.backends import native_status
    ok, why = native_status()
    if not ok:
        pytest.skip(f"the ranks run the cpp backend, which is unavailable here: {why}")
    return "cpp"


def _launch(tmp_path, engine: str, scenarios: list[dict]) -> dict:
    """Runs the scenarios on 2 spawned ranks; returns {name: (rank 0 result, rank 1 result)}."""
    out = str(tmp_path)
    init = f"file://{tmp_path}/rendezvous"  # a file store: no port to find free, none to race for
    ctx = mp.start_processes(jobs.worker, args=(init, engine, scenarios, out), nprocs=jobs.WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"the {engine} job did not finish within {JOB_TIMEOUT_S} s")
    ranks = [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(jobs.WORLD)]
    for sc in scenarios:
        for r, res in enumerate(ranks):
            assert sc["name"] in res, f"{sc['name']}: rank {r} did not reach it (an earlier scenario failed)"
            assert "error" not in res[sc["name"]], f"{sc['name']} failed on rank {r}:\n{res[sc['name']]['error']}"
    return {sc["name"]: tuple(res[sc["name"]] for res in ranks) for sc in scenarios}


def _check_served(name: str, kind: str, backend: str, result: dict, steps: int) -> None:
    """Every forward and backward call of every adapter site went to ``backend``'s fused op."""
    op = jobs.OP[kind]
    expected = {(op, backend): 2 * jobs.SITES[kind] * steps}  # one forward + one backward select each
    assert result["selects"] == expected, f"{name}: dispatch selected {result['selects']}, expected {expected}"
    assert result["fallbacks"] == 0, f"{name}: the library's unfused forward ran {result['fallbacks']} times"
    assert result["probe_selects"] == {(op, backend): jobs.SITES[kind]}, f"{name}: {result['probe_selects']}"
    assert result["probe_fallbacks"] == 0, name


def _check_training(name: str, ranks: tuple, dtype: torch.dtype, truth: dict, same_dtype: dict) -> None:
    """Loss and reduced adapter gradients at every step, against the single-process full batch:
    within ``dtype``'s bound of the float64 ``truth`` and no worse than twice the error of
    ``same_dtype``, the library's own computation in that dtype (plus the harness's floor)."""
    r0, r1 = ranks
    assert torch.equal(r0["loss"], r1["loss"]), f"{name}: the ranks disagree on the reduced loss"
    assert_close(f"{name} loss", r0["loss"], truth["loss"], dtype, "cpu", same_dtype["loss"])
    assert len(r0["grads"]) == len(truth["grads"])
    for step, grads in enumerate(r0["grads"]):
        assert grads.keys() == truth["grads"][step].keys(), name
        for n, g in grads.items():
            assert torch.equal(g, r1["grads"][step][n]), f"{name}: the ranks' reduced gradients differ ({n})"
            assert_close(f"{name} step {step} gradient of {n}", g, truth["grads"][step][n], dtype, "cpu",
                         same_dtype["grads"][step][n])


def _probe_logits(model, backend: str, dtype=torch.float32) -> torch.Tensor:
    model = model.to(dtype).eval()
    with torch.no_grad(), dispatch.use_backend(backend):
        return model(input_ids=jobs.probe()).logits.float()


def _reload(kind: str, what: str, directory: str) -> torch.nn.Module:
    """A single-process model from a checkpoint the ranks wrote."""
    if what == "dcp":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
        path = os.path.join(directory, "full.pt")
        dcp_to_torch_save(os.path.join(directory, "dcp"), path)
        model = jobs.build(kind)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model
    base = jobs.tiny_llama()
    if kind.startswith("lora"):
        model = peft.PeftModel.from_pretrained(base, os.path.join(directory, "peft"))
        fastadapt.patch(model)
        return model
    if kind == "bottleneck":
        fastadapt.load_adapter(base, os.path.join(directory, "bn.safetensors"))
        return base
    return llama_adapter.load_adaption_prompt(base, os.path.join(directory, "adaption_prompt"))


def _check_checkpoints(name: str, tmp_path, engine: str, sc: dict, ranks: tuple, formats: list[str]) -> None:
    mixed = sc.get("mixed", False)
    directory = os.path.join(tmp_path, f"{engine}-{sc['kind']}-{int(mixed)}-{sc['backend']}")
    dtype = torch.bfloat16 if mixed else torch.float32  # FSDP2 runs the probe in its param_dtype too
    for what in formats:
        logits = _probe_logits(_reload(sc["kind"], what, directory), sc["backend"], dtype)
        assert torch.equal(logits, ranks[0]["probe"]), (
            f"{name}: the {what} checkpoint reloads to different outputs (error {rel_err(logits, ranks[0]['probe']):.2e})")


SCENARIOS = {
    "ddp": [dict(name="ddp lora", kind="lora"), dict(name="ddp bottleneck", kind="bottleneck"),
            dict(name="ddp llama-adapter", kind="llama_adapter"),
            dict(name="ddp lora triton", kind="lora_small", backend="triton", steps=1)],
    "fsdp2": [dict(name="fsdp2 lora", kind="lora"), dict(name="fsdp2 lora bf16", kind="lora", mixed=True),
              dict(name="fsdp2 bottleneck bf16", kind="bottleneck", mixed=True),
              dict(name="fsdp2 llama-adapter", kind="llama_adapter")],
    "deepspeed": [dict(name="zero3 lora", kind="lora"), dict(name="zero3 bottleneck", kind="bottleneck"),
                  dict(name="zero3 llama-adapter", kind="llama_adapter")],
}
CHECKPOINTS = {"ddp": {"lora": ["peft"], "lora_small": ["peft"], "bottleneck": ["file"], "llama_adapter": ["file"]},
               "fsdp2": {"lora": ["peft", "dcp"], "bottleneck": ["file", "dcp"], "llama_adapter": ["file", "dcp"]},
               "deepspeed": {}}


def _run_engine(tmp_path, engine: str, backend: str) -> None:
    scenarios = [{"backend": backend, **sc} for sc in SCENARIOS[engine]]
    results = _launch(tmp_path, engine, scenarios)
    for sc in scenarios:
        name, kind, steps = sc["name"], sc["kind"], sc.get("steps", jobs.STEPS)
        ranks = results[name]
        print(f"{name}: {ranks[0]['seconds']:.1f} s on rank 0")
        _check_served(name, kind, sc["backend"], ranks[0], steps)
        # Mixed precision (FSDP2's bf16 parameters, fp32 reduction) is checked against the same
        # single-process computation in bf16 from fp32 master weights.
        dtype = torch.bfloat16 if sc.get("mixed") else torch.float32
        truth = jobs.reference_run(kind, torch.float64, steps=steps)
        same = jobs.reference_run(kind, torch.float32, None if dtype == torch.float32 else dtype, steps=steps)
        _check_training(name, ranks, dtype, truth, same)
        _check_checkpoints(name, tmp_path, engine, sc, ranks, CHECKPOINTS[engine].get(kind, []))


def test_ddp(tmp_path, cpp_backend):
    _run_engine(tmp_path, "ddp", cpp_backend)


def test_fsdp2(tmp_path, cpp_backend):
    _run_engine(tmp_path, "fsdp2", cpp_backend)


def test_deepspeed_zero3(tmp_path, cpp_backend):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (optional; on the CPU: "
                        "DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed)")
    _run_engine(tmp_path, "deepspeed", cpp_backend)
