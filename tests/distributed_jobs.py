"""The jobs of tests/test_distributed.py: tiny patched models trained under DDP, FSDP2 or DeepSpeed
ZeRO-3 by 2 gloo ranks on the CPU, and the single-process runs they are checked against.

Imported by the test (references, checks) and by every spawned rank (:func:`worker`), so it holds
no pytest code. A rank records, per scenario, the mean loss and every adapter gradient after the
engine's reduction (gathered to full tensors) at each optimizer step, which fused backend dispatch
chose for every call and how often the library's own (unfused) forward ran instead, the logits of
a probe batch after training, and checkpoints in the formats a user would write.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import datetime
import os
import time
import traceback

import torch
import torch.distributed as dist

import fastadapt
from fastadapt import dispatch
from fastadapt.inject import llama_adapter
from fastadapt.ops._declare import Declared
from fastadapt.nn.bottleneck import DoubleSeqBnConfig

WORLD = 2
BATCH, SEQ, VOCAB = 4, 8, 64  # each rank trains on BATCH // WORLD rows of the full batch
STEPS = 3
LR = 0.1  # larger steps amplify fp32 rounding along the trajectory past the fp32 bound (PEFT itself: 4.7e-5 at 0.5)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Fused calls per forward pass: one per patched LoRA layer (2 decoder layers), one per bottleneck
# adapter (Houlsby: after attention and after the FFN, 2 layers), one per adapted attention.
# MoE: one per experts module (2 decoder layers), whatever projections its LoRA targets.
SITES = {"lora": 2 * len(LORA_TARGETS), "lora_small": 2 * 2, "bottleneck": 2 * 2, "llama_adapter": 2, "moe": 2}
OP = {"lora": "lora_linear", "lora_small": "lora_linear", "bottleneck": "bottleneck_adapter",
      "llama_adapter": "prefix_attention", "moe": "moe_lora_experts"}
MOE_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tiny_llama():
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                      max_position_embeddings=32, attn_implementation="sdpa")
    return transformers.LlamaForCausalLM(config)


def tiny_moe():
    """A tiny Qwen3-MoE: 2 decoder layers of 4 experts, top-2; transformers' eager experts (the
    float64 truth runs them: its grouped_mm takes no float64)."""
    import transformers
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, head_dim=8,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         num_experts=4, num_experts_per_tok=2, vocab_size=VOCAB,
                                         max_position_embeddings=32, attn_implementation="sdpa")
    config._experts_implementation = "eager"
    return transformers.Qwen3MoeForCausalLM(config)


def base_model(kind: str) -> torch.nn.Module:
    return tiny_moe() if kind == "moe" else tiny_llama()


def build(kind: str, fused: bool = True) -> torch.nn.Module:
    """The model of a scenario, the same on every rank and in the test process (seeded)."""
    model = base_model(kind)
    if kind == "moe":  # PEFT's LoRA on the experts' 3-D parameters (target_parameters)
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                           target_modules=[], target_parameters=MOE_TARGETS))
        if fused:
            fastadapt.patch(model, strict=True)
    elif kind in ("lora", "lora_small"):
        import peft
        targets = LORA_TARGETS if kind == "lora" else ["q_proj", "v_proj"]
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                           target_modules=targets))
        if fused:
            fastadapt.patch(model)
    elif kind == "bottleneck":
        fastadapt.add_adapter(model, "bn", DoubleSeqBnConfig(reduction_factor=4))  # Houlsby, bottleneck 8
    elif kind == "llama_adapter":
        fastadapt.add_adaption_prompt(model, adapter_len=4, adapter_layers=2, gate="per_head", gate_tanh=True)
        with torch.no_grad():  # zero-init gates would leave the prompts without gradient
            for name, p in model.named_parameters():
                if name.endswith("adaption_gate"):
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
        llama_adapter.set_fused(model, fused)
    else:
        raise ValueError(kind)
    return model


def batches(steps: int = STEPS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g) for _ in range(steps)]


def probe() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    # DDP and the DeepSpeed engine name parameters "module.<name>".
    return {n.removeprefix("module."): p for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------
# Single-process references


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    # FSDP2's param_dtype casts parameters only: buffers (RoPE's inv_freq) stay in fp32.
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def reference_run(kind: str, dtype: torch.dtype, compute_dtype: torch.dtype | None = None,
                  steps: int = STEPS, backend: str = "reference", micro_batches: int = 1) -> dict:
    """The full batch in one process, plain SGD. With the ``reference`` backend it is the library's
    own computation (PEFT's LoRA forward, the two-pass LLaMA-Adapter, the bottleneck op's plain
    PyTorch); with another backend, the same patched model the ranks run. Master weights in
    ``dtype``; each step computed in ``compute_dtype`` (FSDP2's mixed precision: a copy of the
    master weights with the parameters cast, whose gradients come back in ``dtype``). With ``micro_batches`` the batch is
    split as over the ranks, and the micro-batches' gradients averaged in ``dtype``, which is the
    arithmetic of data parallelism with a reduction in ``dtype``."""
    master = build(kind, fused=backend != "reference").to(dtype)
    losses, grads = [], []
    rows = BATCH // micro_batches
    with dispatch.use_backend(backend):
        for ids in batches(steps):
            work = master if compute_dtype is None else cast_parameters(copy.deepcopy(master), compute_dtype)
            loss, step = 0.0, {}
            for i in range(micro_batches):
                x = ids[i * rows:(i + 1) * rows]
                work.zero_grad(set_to_none=True)
                micro = work(input_ids=x, labels=x).loss
                micro.backward()
                loss = loss + micro.detach().to(dtype)
                for n, p in trainable(work).items():
                    step[n] = step.get(n, 0.0) + p.grad.to(dtype)
            step = {n: g / micro_batches for n, g in step.items()}
            losses.append(loss / micro_batches)
            grads.append(step)
            with torch.no_grad():
                for n, p in trainable(master).items():
                    p.add_(step[n], alpha=-LR)
    return {"loss": torch.stack(losses), "grads": grads}


# ---------------------------------------------------------------------------------------------
# The ranks


@contextlib.contextmanager
def spy(kind: str):
    """Counts, per (op, backend), what dispatch selected, and how often the library's own forward
    ran instead of the fused op (PEFT's LoRA forward, the two-pass adapter attention)."""
    seen = {"selects": collections.Counter(), "fallbacks": 0}
    run_forward, run_backward = Declared._run_forward, Declared._run_backward

    # Every path of every op (eager, custom op) runs its backend through these two.
    def counting_forward(self, impl, args):
        seen["selects"][(self.spec.name, impl.backend, "forward")] += 1
        return run_forward(self, impl, args)

    def counting_backward(self, impl, *rest):
        seen["selects"][(self.spec.name, impl.backend, "backward")] += 1
        return run_backward(self, impl, *rest)

    restore = [(Declared, "_run_forward", run_forward), (Declared, "_run_backward", run_backward)]
    Declared._run_forward, Declared._run_backward = counting_forward, counting_backward
    # A fallback runs PEFT's own forward: LoRA's Linear, or the MoE experts' ParamWrapper (strict
    # would refuse it anyway).
    peft_layer = {"lora": "Linear", "lora_small": "Linear", "moe": "ParamWrapper"}.get(kind)
    if peft_layer is not None:
        from peft.tuners.lora import layer
        cls = getattr(layer, peft_layer)
        peft_forward = cls.forward

        def counted(self, *args, **kwargs):
            seen["fallbacks"] += 1
            return peft_forward(self, *args, **kwargs)

        restore.append((cls, "forward", peft_forward))
        cls.forward = counted
    if kind == "llama_adapter":
        two_pass = llama_adapter._two_pass

        def counted_two_pass(*args, **kwargs):
            seen["fallbacks"] += 1
            return two_pass(*args, **kwargs)

        restore.append((llama_adapter, "_two_pass", two_pass))
        llama_adapter._two_pass = counted_two_pass
    try:
        yield seen
    finally:
        for owner, name, value in restore:
            setattr(owner, name, value)


def _wrap(engine: str, model: torch.nn.Module, mixed: bool):
    """(wrapped model, optimizer) for ``engine``; the optimizer is built on the wrapped parameters."""
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(model)
    elif engine == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed \
            else MixedPrecisionPolicy()
        for layer in decoder_layers(model):
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    elif engine == "deepspeed":
        import deepspeed
        optimizer = torch.optim.SGD(list(trainable(model).values()), lr=LR)
        # Persistence threshold 0: every parameter is partitioned, however small (by default
        # ZeRO-3 keeps parameters under 1e5 elements whole on every rank, which would test nothing).
        config = {"train_micro_batch_size_per_gpu": BATCH // WORLD, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                  "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
        engine_, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        return engine_, optimizer
    return model, torch.optim.SGD(list(trainable(model).values()), lr=LR)


def _full_grad(engine: str, param) -> torch.Tensor:
    if engine == "deepspeed":
        from deepspeed.utils import safe_get_full_grad
        return safe_get_full_grad(param).float().clone()
    grad = param.grad
    if hasattr(grad, "full_tensor"):  # FSDP2: the rank's shard of the reduced gradient (a DTensor)
        grad = grad.full_tensor()
    return grad.float().clone()


def run_scenario(rank: int, engine: str, kind: str, mixed: bool, backend: str, steps: int, out: str,
                 patch_after: bool, fused: bool) -> dict:
    start = time.perf_counter()
    model = build(kind, fused=fused and not patch_after)
    shard = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    with dispatch.use_backend(backend), spy(kind) as seen:
        wrapped, optimizer = _wrap(engine, model, mixed)
        if patch_after:  # fastadapt.patch on the wrapped model (DDP, FSDP2 or the DeepSpeed engine)
            assert fastadapt.patch(wrapped).patched
        params = trainable(wrapped)
        losses, grads = [], []
        for ids in batches(steps):
            if engine != "deepspeed":  # the engine's step clears its (partitioned) gradients itself
                optimizer.zero_grad(set_to_none=True)
            x = ids[shard]
            loss = wrapped(input_ids=x, labels=x).loss
            if engine == "deepspeed":
                wrapped.backward(loss)
            else:
                loss.backward()
            mean = loss.detach().float().clone()
            dist.all_reduce(mean)  # gloo has no AVG
            losses.append(mean / WORLD)
            grads.append({n: _full_grad(engine, p) for n, p in params.items()})
            if engine == "deepspeed":
                wrapped.step()
            else:
                optimizer.step()
        train_selects = dict(seen["selects"])
        train_fallbacks = seen["fallbacks"]
        wrapped.eval()
        with torch.no_grad():
            # Every rank runs the probe: FSDP2 and ZeRO-3 gather parameters collectively. DDP's
            # wrapper would broadcast buffers; its module computes the same.
            runner = wrapped.module if engine == "ddp" else wrapped
            logits = runner(input_ids=probe()).logits.float()
        result = {"loss": torch.stack(losses), "grads": grads, "probe": logits,
                  "selects": train_selects, "fallbacks": train_fallbacks,
                  "probe_selects": {k: v - train_selects.get(k, 0) for k, v in seen["selects"].items()
                                    if v > train_selects.get(k, 0)},
                  "probe_fallbacks": seen["fallbacks"] - train_fallbacks}
        if fused:
            save_checkpoints(engine, kind, wrapped, rank, os.path.join(out, f"{engine}-{kind}-{int(mixed)}-{backend}"))
    result["seconds"] = time.perf_counter() - start
    return result


def save_checkpoints(engine: str, kind: str, wrapped, rank: int, directory: str) -> None:
    """The checkpoints a user writes: PEFT's save_pretrained, fastadapt's save_adapter /
    save_adaption_prompt, and for FSDP2 also the distributed (sharded) state dict."""
    inner = wrapped.module if engine in ("ddp", "deepspeed") else wrapped
    os.makedirs(directory, exist_ok=True)
    main = rank == 0
    if engine == "fsdp2":
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        dcp.save(get_model_state_dict(wrapped), checkpoint_id=os.path.join(directory, "dcp"))
    if kind.startswith("lora") or kind == "moe":
        if engine == "ddp" and main:
            inner.save_pretrained(os.path.join(directory, "peft"))
        elif engine == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if main:
                inner.save_pretrained(os.path.join(directory, "peft"), state_dict=full)
        elif engine == "deepspeed":
            # PEFT's own state dict would hold ZeRO-3's empty partitions: consolidate first (collective).
            full = wrapped._zero3_consolidated_16bit_state_dict()
            if main:
                inner.save_pretrained(os.path.join(directory, "peft"), state_dict=full)
    elif kind == "bottleneck":  # every rank calls: gathered where sharded, rank 0 writes
        fastadapt.save_adapter(inner, "bn", os.path.join(directory, "bn.safetensors"))
    elif kind == "llama_adapter":
        llama_adapter.save_adaption_prompt(inner, os.path.join(directory, "adaption_prompt"))


def worker(rank: int, init_method: str, engine: str, scenarios: list[dict], out: str) -> None:
    """One rank: runs each scenario in turn and writes {name: result or {"error": traceback}}."""
    torch.set_num_threads(1)
    if engine == "deepspeed":
        os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    results = {}
    try:
        for sc in scenarios:
            try:
                results[sc["name"]] = run_scenario(rank, engine, sc["kind"], sc.get("mixed", False), sc["backend"],
                                                   sc.get("steps", STEPS), out, sc.get("patch_after", False),
                                                   sc.get("fused", True))
            except Exception:
                results[sc["name"]] = {"error": traceback.format_exc()}
                break  # the ranks may no longer agree on the collectives that follow
    finally:
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()
