"""End-to-end training step on CUDA: a 4-layer Llama (hidden 4096, FFN 11008, 32 heads, random
weights from a config), LoRA r=16 on all seven projections; frozen model vs PEFT vs PEFT patched
by fastadapt, fwd+bwd, in one run.

    python benchmarks/bench_model.py [--batch 4 --seq 2048 --layers 4]

The anchor (DESIGN.md, H100, bf16, B4 S2048): frozen 77.3 ms, PEFT 121.8 ms (1.57x).
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_model.py needs a CUDA device.")
        return 2
    import peft
    import transformers
    from triton.testing import do_bench

    import fastadapt

    cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers,
                                   num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                   max_position_embeddings=args.seq, attn_implementation="sdpa")
    torch.manual_seed(0)
    frozen = transformers.LlamaModel(cfg).to("cuda", torch.bfloat16).requires_grad_(False)
    lora_cfg = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, autocast_adapter_dtype=False,
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"])
    peft_model = peft.get_peft_model(copy.deepcopy(frozen), lora_cfg)
    ours = copy.deepcopy(peft_model)
    print(fastadapt.patch(ours).__str__().splitlines()[0])

    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device="cuda")
    # The frozen model needs an input that requires grad, or autograd has nothing to do.
    embeds = frozen.embed_tokens(ids).detach().requires_grad_()

    def step(model, inputs_embeds):
        def run():
            model(inputs_embeds=inputs_embeds).last_hidden_state.float().square().mean().backward()
        return run

    rows = {
        "frozen": step(frozen, embeds),
        "peft": step(peft_model, embeds),
        "fastadapt": step(ours, embeds),
    }
    print(f"{torch.cuda.get_device_name()}, bf16, Llama {args.layers}L h4096, B{args.batch} S{args.seq}, LoRA r{args.rank}")
    times = {}
    for name, fn in rows.items():
        p50, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=3, rep=20)
        times[name] = p50
        print(f"{name:10s} {p50:9.2f} ms  (p20 {p20:.2f}, p80 {p80:.2f})  {p50 / times['frozen']:.2f}x frozen")
    return 0


if __name__ == "__main__":
    sys.exit(main())
