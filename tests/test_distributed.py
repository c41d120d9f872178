"""Patched models under DDP, FSDP2 (``fully_shard``) and DeepSpeed ZeRO-3: real 2-rank jobs on the
CPU (gloo), checked against single-process runs on the full batch.

Each test spawns one job of 2 ranks (tests/distributed_jobs.py) that runs several scenarios in
turn: a tiny random Llama with PEFT LoRA patched by ``fastadapt.patch``, with bottleneck adapters
(``fastadapt.add_adapter``) and with LLaMA-Adapter (``fastadapt.add_adaption_prompt``). For each
scenario the test checks, at every one of several SGD steps, the mean loss and every adapter
gradient after the engine's reduction against single-process runs on the full batch (see
``_check_training``; under ZeRO-3 also against the same model without fastadapt's kernels under
ZeRO-3); that the forced fused backend served every call (dispatch spied on in the ranks, and
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
from harness import assert_close, bound, rel_err

import distributed_jobs as jobs
import fastadapt
from fastadapt import dispatch
from fastadapt.inject import llama_adapter

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available in this torch build",
                allow_module_level=True)

JOB_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def cpp_backend():
    # Built (or loaded from the cache) here, once, under no job's time limit: the ranks then load
    # the built extension without waiting on anyone (fastadapt/_native.py, built.ok).
    from fastadapt import _native
    ok, why = _native.status()
    if not ok:
        if _native._compiler_reason() or os.environ.get(_native.DISABLE_ENV, "0") not in ("", "0"):
            pytest.skip(f"the ranks run the cpp backend, which is unavailable here: {why}")
        pytest.fail(f"building fastadapt._C failed (before any rank started): {why}")
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
            error = res[sc["name"]].get("error")
            assert error is None, f"{sc['name']} failed on rank {r}:\n{error}"
    return {sc["name"]: tuple(res[sc["name"]] for res in ranks) for sc in scenarios}


def _check_served(name: str, kind: str, backend: str, result: dict, steps: int) -> None:
    """Every forward and backward call of every adapter site went to ``backend``'s fused op."""
    op = jobs.OP[kind]
    calls = jobs.SITES[kind] * steps
    expected = {(op, backend, "forward"): calls, (op, backend, "backward"): calls}
    assert result["selects"] == expected, f"{name}: dispatch selected {result['selects']}, expected {expected}"
    assert result["fallbacks"] == 0, f"{name}: the library's unfused forward ran {result['fallbacks']} times"
    assert result["probe_selects"] == {(op, backend, "forward"): jobs.SITES[kind]}, f"{name}: {result['probe_selects']}"
    assert result["probe_fallbacks"] == 0, name


def _check_training(name: str, ranks: tuple, dtype: torch.dtype, expected: dict, library: dict | None = None) -> None:
    """Loss and reduced adapter gradients at every step. fp32: ``expected`` is the float64 truth on
    the full batch, and the ranks' values must be within the fp32 bound of it and no worse than
    twice the error of ``library``, the library's own fp32 computation (PEFT's LoRA forward,
    PyTorch). bf16: ``expected`` is the same patched model in one process on the full batch taken
    as the ranks' micro-batches, and the ranks' values must be within the bf16 bound of it.

    Why not the whole bf16 batch at once: at model scale two bf16 computations that round at
    different points (a 4-row batch, two 2-row halves) differ by the model's own bf16 error, 5e-2
    in PEFT's gradients here; after one SGD step the fp32 master weights differ in the last bits,
    their bf16 casts in a few, and the gradients by as much again. The fp32 run of the same FSDP2
    code path is what checks against the full batch."""
    r0, r1 = ranks
    assert torch.equal(r0["loss"], r1["loss"]), f"{name}: the ranks disagree on the reduced loss"
    pairs = [("loss", r0["loss"], expected["loss"], library and library["loss"])]
    assert len(r0["grads"]) == len(expected["grads"])
    for step, grads in enumerate(r0["grads"]):
        assert grads.keys() == expected["grads"][step].keys(), name
        for n, g in grads.items():
            assert torch.equal(g, r1["grads"][step][n]), f"{name}: the ranks' reduced gradients differ ({n})"
            pairs.append((f"step {step} gradient of {n}", g, expected["grads"][step][n],
                          library and library["grads"][step][n]))
    for what, out, exact, same_dtype in pairs:
        assert_close(f"{name} {what}", out, exact, dtype, "cpu", same_dtype)


def _probe_logits(model, backend: str, dtype=torch.float32) -> torch.Tensor:
    model = jobs.cast_parameters(model, dtype).eval()
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
    base = jobs.base_model(kind)
    if kind.startswith("lora") or kind == "moe":
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
    "ddp": [dict(name="ddp lora (patched after wrapping)", kind="lora", patch_after=True), dict(name="ddp bottleneck", kind="bottleneck"),
            dict(name="ddp llama-adapter", kind="llama_adapter"),
            dict(name="ddp lora triton", kind="lora_small", backend="triton", steps=1)],
    "fsdp2": [dict(name="fsdp2 lora", kind="lora"), dict(name="fsdp2 lora bf16 (patched after wrapping)", kind="lora", mixed=True, patch_after=True),
              dict(name="fsdp2 bottleneck bf16", kind="bottleneck", mixed=True),
              dict(name="fsdp2 llama-adapter", kind="llama_adapter")],
    # DeepSpeed 0.19's ZeRO-3 steps on the CPU drift from the single process: with the bottleneck
    # adapters, from the first optimizer step (every bias moved about half as far, whether the
    # adapter runs the fused op, its plain-PyTorch backend, or plain nn.Linear calls; the gradients
    # it steps with are right), with LoRA at the third step's gradients, with PEFT's own forward as
    # with the fused one. So each fused run is checked against the same model under ZeRO-3 without
    # fastadapt's kernels for every step, and against the single process until the drift.
    "deepspeed": [dict(name="zero3 lora", kind="lora", single_process_steps=2, same_as="zero3 peft (unpatched)"),
                  dict(name="zero3 peft (unpatched)", kind="lora", fused=False, single_process_steps=2),
                  dict(name="zero3 llama-adapter", kind="llama_adapter", steps=2),
                  dict(name="zero3 bottleneck", kind="bottleneck", single_process_steps=1,
                       same_as="zero3 bottleneck (reference backend)"),
                  dict(name="zero3 bottleneck (reference backend)", kind="bottleneck", backend="reference",
                       single_process_steps=1)],
}
CHECKPOINTS = {"ddp": {"lora": ["peft"], "lora_small": ["peft"], "bottleneck": ["file"], "llama_adapter": ["file"]},
               "fsdp2": {"lora": ["peft", "dcp"], "bottleneck": ["file", "dcp"], "llama_adapter": ["file", "dcp"],
                         "moe": ["peft", "dcp"]},
               "deepspeed": {"lora": ["peft"], "bottleneck": ["file"], "llama_adapter": ["file"]}}


# PEFT target_parameters LoRA on a tiny Qwen3-MoE's experts, patched with strict=True: a job of its own.
MOE_SCENARIOS = [dict(name="fsdp2 moe", kind="moe"),
                 dict(name="fsdp2 moe bf16 (patched after wrapping)", kind="moe", mixed=True, patch_after=True)]


def _run_engine(tmp_path, engine: str, backend: str, scenarios: list[dict] | None = None) -> None:
    scenarios = [{"backend": backend, **sc} for sc in (SCENARIOS[engine] if scenarios is None else scenarios)]
    results = _launch(tmp_path, engine, scenarios)
    for sc in scenarios:
        name, kind, steps = sc["name"], sc["kind"], sc.get("steps", jobs.STEPS)
        ranks = results[name]
        print(f"{name}: {ranks[0]['seconds']:.1f} s on rank 0")
        if sc.get("fused", True):
            _check_served(name, kind, sc["backend"], ranks[0], steps)
        else:
            assert not ranks[0]["selects"], f"{name}: {ranks[0]['selects']}"
        if "same_as" in sc:  # the fused run against the same model without fastadapt's kernels, same engine
            other = results[sc["same_as"]][0]
            for what, out, ref in [("loss", ranks[0]["loss"], other["loss"])] + [
                    (f"step {i} gradient of {n}", g, other["grads"][i][n])
                    for i, grads in enumerate(ranks[0]["grads"]) for n, g in grads.items()]:
                err = rel_err(out, ref)
                assert err <= bound(torch.float32, "cpu"), f"{name} {what}: {err:.2e} from {sc['same_as']}"
        steps = sc.get("single_process_steps", steps)
        ranks = tuple({"loss": r["loss"][:steps], "grads": r["grads"][:steps]} for r in ranks)
        if sc.get("mixed"):  # FSDP2's bf16 parameters and fp32 reduction, the same recipe in one process
            single = jobs.reference_run(kind, torch.float32, torch.bfloat16, steps=steps, backend=sc["backend"],
                                        micro_batches=jobs.WORLD)
            _check_training(name, ranks, torch.bfloat16, single)
        else:
            truth = jobs.reference_run(kind, torch.float64, steps=steps)
            _check_training(name, ranks, torch.float32, truth, jobs.reference_run(kind, torch.float32, steps=steps))
        if sc.get("fused", True):
            _check_checkpoints(name, tmp_path, engine, sc, results[name], CHECKPOINTS[engine].get(kind, []))


def test_ddp(tmp_path, cpp_backend):
    _run_engine(tmp_path, "ddp", cpp_backend)


def test_fsdp2(tmp_path, cpp_backend):
    _run_engine(tmp_path, "fsdp2", cpp_backend)


def test_fsdp2_moe(tmp_path, cpp_backend):
    _run_engine(tmp_path, "fsdp2", cpp_backend, MOE_SCENARIOS)


def test_deepspeed_zero3(tmp_path, cpp_backend):
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (optional; on the CPU: "
                        "DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed)")
    _run_engine(tmp_path, "deepspeed", cpp_backend)


def test_adding_adapters_after_wrapping_raises(tmp_path):
    # One rank in this process: enough to wrap, and the check looks at the wrapper and the parameters.
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="add_adapter must run before the model is wrapped"):
            fastadapt.add_adapter(DistributedDataParallel(jobs.tiny_llama()), "bn", "houlsby")
        sharded = jobs.tiny_llama()
        fully_shard(sharded)
        with pytest.raises(RuntimeError, match="add_adaption_prompt must run before the model is wrapped"):
            fastadapt.add_adaption_prompt(sharded, adapter_len=2, adapter_layers=1)
        # Outside the forward the parameters are shards: repr names no backend rather than read them.
        model = jobs.build("bottleneck")
        fully_shard(model)
        assert "backend=chosen per call (parameters sharded)" in repr(model)
    finally:
        torch.distributed.destroy_process_group()
