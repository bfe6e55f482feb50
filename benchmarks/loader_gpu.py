"""Decode speed and peak memory of the loader's modules: bf16 versus GPTQ int4 (torch kernel and
dequantize fallback), and int4 with every expert offloaded to CPU memory behind the GPU expert cache.

A synthetic Grok 2-shaped model is built in memory (random weights, round-to-nearest int4 g128), so
nothing is read from disk. One short run:

    python benchmarks/loader_gpu.py                       # GPU, ~8B-parameter model
    python benchmarks/loader_gpu.py --device cpu --size small --new-tokens 8 --threads 1   # CPU check

Prints one line per variant (load s, prefill s, decode tokens/s, weight and peak memory) and how far
the int4 kernel's logits are from the fallback's on the same weights.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from grokquant.gptq.layout import PackedLinear, gptq_tensors
from grokquant.grok.model import Grok2ForCausalLM, KVCache
from grokquant.runtime.offload import apply_placement
from grokquant.runtime.placement import Placement
from grokquant.runtime.qlinear import dense_linear, gptq_linear, module_bytes
from grokquant.quant.gptq import IntQuantConfig, rtn
from grokquant.grok.synth import synth_config

SIZES = {  # hidden, heads, kv heads, dense width, expert width, layers, vocab
    "small": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=512,
                  moe_intermediate_size=512, num_hidden_layers=2, vocab_size=512),
    "medium": dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                   intermediate_size=4096, moe_intermediate_size=4096, num_hidden_layers=4, vocab_size=32768),
    "large": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                  intermediate_size=8192, moe_intermediate_size=8192, num_hidden_layers=8, vocab_size=32768),
}


def build(cfg, variant: str, device: torch.device, dtype: torch.dtype) -> Grok2ForCausalLM:
    """The model with weights drawn per tensor from a fixed seed: every variant sees the same weights."""
    model = Grok2ForCausalLM.empty(cfg)
    quant = IntQuantConfig(bits=4, group_size=128)
    for index, (name, shape) in enumerate(cfg.all_shapes().items()):
        g = torch.Generator(device).manual_seed(index)
        linear = len(shape) == 2 and name != "model.embed_tokens.weight" and not name.endswith("gate.weight")
        if not linear:
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g, device=device) * 0.02
            model.assign({name: t}, dtype, device)
            continue
        W = torch.randn(shape, generator=g, device=device) * 0.02
        if variant == "bf16" or name == "lm_head.weight":
            module = dense_linear(W, device, dtype)
        else:
            t = gptq_tensors(rtn(W[None], quant), 0, 4)
            p = PackedLinear(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 128, True)
            module = gptq_linear(p, device, dtype, "dequant" if variant == "int4-dequant" else "auto")
        model.set_submodule(name[: -len(".weight")], module)
        del W
    return model


def weight_bytes(model) -> int:
    return sum(module_bytes(m) for m in model.modules() if not list(m.children()))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def run(model, device, prompt_len: int, new_tokens: int) -> tuple[float, float, torch.Tensor]:
    prompt = torch.randint(0, model.cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    cache = KVCache(model.cfg.num_hidden_layers)
    sync(device)
    start = time.perf_counter()
    logits = model(prompt.to(model.model.embed_tokens.weight.device), cache)
    sync(device)
    prefill = time.perf_counter() - start
    first = logits[0, -1].float().cpu()
    token = int(first.argmax())
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits = model(torch.tensor([[token]], device=model.model.embed_tokens.weight.device), cache)
        token = int(logits[0, -1].argmax())
    sync(device)
    return prefill, new_tokens / (time.perf_counter() - start), first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", default=None, choices=list(SIZES), help="default: large on GPU, small on CPU")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--cache", type=int, default=4, help="experts held by the GPU cache in the offload variant")
    ap.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = args.size or ("large" if device.type == "cuda" else "small")
    cfg = synth_config("tiny", **SIZES[size])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n_params = sum(torch.Size(s).numel() for s in cfg.all_shapes().values())
    print(f"{size}: {n_params / 1e9:.2f} B parameters, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_local_experts} experts of width {cfg.moe_intermediate_size}; {device}, {dtype}; "
          f"prompt {args.prompt}, {args.new_tokens} new tokens")
    print(f"{'variant':<14}{'load s':>8}{'prefill s':>11}{'decode tok/s':>14}{'weights GiB':>13}{'peak GiB':>10}")
    firsts = {}
    for variant in ("bf16", "int4", "int4-dequant", "int4-offload"):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        model = build(cfg, "int4" if variant == "int4-offload" else variant, device, dtype)
        if variant == "int4-offload":  # experts rest in (pinned) CPU memory, fetched through the LRU cache
            gpu = f"cuda:{device.index or 0}"  # on a CPU run, a stand-in GPU that is the CPU
            placement = Placement([gpu] * cfg.num_hidden_layers, [frozenset({"experts"})] * cfg.num_hidden_layers,
                                  embed=gpu, head=gpu, expert_cache={gpu: args.cache})
            stats = apply_placement(model, placement, physical={gpu: str(device)})
        sync(device)
        load_s = time.perf_counter() - start
        resident = weight_bytes(model) if variant != "int4-offload" else sum(
            t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()) if t.device == device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        prefill, tps, first = run(model, device, args.prompt, args.new_tokens)
        peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else float("nan"))
        firsts[variant] = first
        print(f"{variant:<14}{load_s:>8.1f}{prefill:>11.3f}{tps:>14.1f}{resident / 2**30:>13.2f}{peak / 2**30:>10.2f}")
        if variant == "int4-offload":
            print(f"{'':<14}expert fetches {stats['misses']}, cache hits {stats['hits']}, "
                  f"{stats['bytes'] / 2**30:.2f} GiB moved")
        del model
    ref = firsts["int4-dequant"]
    for variant in ("int4", "int4-offload"):
        diff = (firsts[variant] - ref).abs().max() / ref.abs().max()
        print(f"{variant} vs int4-dequant last-token logits: max |diff| / max |logit| = {diff:.2e}")
    diff = (firsts["int4"] - firsts["bf16"]).abs().max() / firsts["bf16"].abs().max()
    print(f"int4 vs bf16 (quantization error): {diff:.2e}")
    if device.type == "cuda":
        print("(peak: weights resident on the GPU + KV cache + activations + fetched experts during the run)")


if __name__ == "__main__":
    main()
