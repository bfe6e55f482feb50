"""`grokquant quantize`: calibrated GPTQ (or round-to-nearest) artifacts in the auto-gptq format.

One pass over the layers: load layer l, push the calibration hidden states through it while hooks
collect each input group's Hessian (experts: from the tokens routed to them), quantize every linear
of the layer (the 8 experts of a projection in one batch), write the layer's shard, go on with the
unquantized layer's outputs. Work is checkpointed per layer under `.OUT.partial` together with a
fingerprint of the inputs and options, so a re-run after an interruption resumes and produces the
same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from .calibrate import LayerStats, _Collector
from .checkpoint import Checkpoint
from .config import expert_name
from .errors import GrokquantError
from .export.gptq_format import gptq_tensors, packable
from .model import Grok2ForCausalLM, rope_cos_sin
from .quant.gptq import IntQuantConfig, IntQuantized, gptq, rtn
from .recipe import GPTQRecipe

# linear -> (statistics group, tensor class)
DENSE_LINEARS = {
    "self_attn.q_proj": ("attn_qkv", "attention"), "self_attn.k_proj": ("attn_qkv", "attention"),
    "self_attn.v_proj": ("attn_qkv", "attention"), "self_attn.o_proj": ("attn_o", "attention"),
    "mlp.gate_proj": ("mlp_gate_up", "dense_mlp"), "mlp.up_proj": ("mlp_gate_up", "dense_mlp"),
    "mlp.down_proj": ("mlp_down", "dense_mlp"),
}
EXPERT_GROUP = {"w1": "w13", "w3": "w13", "w2": "w2"}


def fingerprint(ckpt: Checkpoint, recipe: GPTQRecipe, tokens: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(asdict(ckpt.config), sort_keys=True).encode())
    for f in ckpt.files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(json.dumps(asdict(recipe), sort_keys=True, default=str).encode())
    h.update(tokens.numpy().tobytes())
    return h.hexdigest()


def _quantize_stack(W: torch.Tensor, H: torch.Tensor, cfg: IntQuantConfig, method: str,
                    fallback: list[bool]) -> IntQuantized:
    """Batched GPTQ with round-to-nearest for the matrices flagged in `fallback`."""
    if method == "rtn" or all(fallback):
        return rtn(W, cfg)
    q = gptq(W, H, cfg)
    if any(fallback):
        r = rtn(W, cfg)
        for b, fb in enumerate(fallback):
            if fb:
                q.codes[b], q.scales[b], q.zeros[b], q.g_idx[b] = r.codes[b], r.scales[b], r.zeros[b], r.g_idx[b]
    return q


@dataclass
class LayerResult:
    tensors: dict[str, torch.Tensor]  # as stored in the artifact
    dequantized: dict[str, torch.Tensor]  # release name -> the weights the artifact represents
    report: list[dict]  # per quantized stack: class, bits, output error of GPTQ and of RTN, min tokens


def _output_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor) -> float:
    """Σ_b ‖(W_b − Ŵ_b) X_b‖² = tr(D H Dᵀ) from the calibration Hessians."""
    D = Wq - W
    return float(torch.einsum("boi,bij,boj->", D, H, D))


def quantize_layer(ckpt: Checkpoint, layer: int, stats: LayerStats, recipe: GPTQRecipe) -> LayerResult:
    """Quantize every linear of one decoder layer (experts of a projection in one batch)."""
    cfg = ckpt.config
    prefix = f"model.layers.{layer}."
    res = LayerResult({}, {}, [])

    def emit(cls: str, names: list[str], W, H, qc: IntQuantConfig, fallback: list[bool], tokens: int):
        q = _quantize_stack(W, H, qc, recipe.method, fallback)
        Wq = q.dequantize()
        res.report.append({"class": cls, "bits": qc.bits, "error": _output_error(W, Wq, H),
                           "rtn_error": _output_error(W, rtn(W, qc).dequantize(), H), "min_tokens": tokens})
        for b, name in enumerate(names):
            base = name[: -len(".weight")]
            for k, v in gptq_tensors(q, b, qc.bits).items():
                res.tensors[f"{base}.{k}"] = v
            res.dequantized[name] = Wq[b]

    for linear, (group, cls) in DENSE_LINEARS.items():
        qc = recipe.config_for(cls)
        name = prefix + linear + ".weight"
        W = ckpt.tensor(name).float()[None]
        if qc is not None and packable(W.shape[1], W.shape[2], qc.bits):
            emit(cls, [name], W, stats.hessian[group][None], qc, [False], stats.count[group])
    qc = recipe.experts
    for proj in ("w1", "w3", "w2"):
        names = [expert_name(layer, e, proj) for e in range(cfg.num_local_experts)]
        W = torch.stack([ckpt.tensor(n).float() for n in names])
        if qc is None or not packable(W.shape[1], W.shape[2], qc.bits):
            continue
        groups = [f"expert{e}_{EXPERT_GROUP[proj]}" for e in range(cfg.num_local_experts)]
        counts = [stats.count.get(g, 0) for g in groups]
        H, fallback = [], []
        for g, c in zip(groups, counts):
            own = stats.hessian.get(g, torch.zeros(W.shape[2], W.shape[2]))
            covered = c >= recipe.min_tokens
            if covered or recipe.under_covered == "rtn":
                H.append(own)
            elif recipe.under_covered == "all-tokens":
                H.append(stats.hessian[g + "_all"])
            else:  # prior: the expert's own tokens plus min_tokens tokens' worth of the all-token average
                H.append(own + stats.hessian[g + "_all"] * (recipe.min_tokens / stats.count["mlp_gate_up"]))
            fallback.append(not covered and recipe.under_covered == "rtn")
        emit("experts", names, W, torch.stack(H), qc, fallback, min(counts))
    for name in cfg.layer_shapes(layer):
        if name not in res.dequantized:
            res.tensors[name] = ckpt.tensor(name)  # norms, router and anything not packable stay bf16
    return res


def _all_token_hessians(layer_module, stats: LayerStats, recipe: GPTQRecipe, gelu_flavour: str,
                        m: torch.Tensor) -> None:
    """Hessians of under-covered experts as if every calibration token m [N, H] were routed to them."""
    from .model import gelu

    for e, expert in enumerate(layer_module.block_sparse_moe.experts):
        if stats.count.get(f"expert{e}_w13", 0) >= recipe.min_tokens:
            continue
        stats.hessian[f"expert{e}_w13_all"] = stats.hessian["mlp_gate_up"]  # the same input m, all tokens
        a = gelu(expert.w1(m), gelu_flavour) * expert.w3(m)
        stats.hessian[f"expert{e}_w2_all"] = a.T @ a


def summarize(reports: list[dict]) -> list[dict]:
    """Per tensor class: bits, output-error reduction of GPTQ versus round-to-nearest, fewest tokens."""
    out = {}
    for r in reports:
        s = out.setdefault(r["class"], {"class": r["class"], "bits": r["bits"], "error": 0.0, "rtn_error": 0.0,
                                        "min_tokens": r["min_tokens"]})
        s["error"] += r["error"]
        s["rtn_error"] += r["rtn_error"]
        s["min_tokens"] = min(s["min_tokens"], r["min_tokens"])
    for s in out.values():
        s["reduction_vs_rtn"] = 1 - s["error"] / s["rtn_error"] if s["rtn_error"] else 0.0
    return list(out.values())


@torch.no_grad()
def quantize(checkpoint: str | Path, out: str | Path, recipe: GPTQRecipe, tokens: torch.Tensor, force: bool = False,
             batch_size: int = 8, on_layer: Callable[[int], None] | None = None) -> Path:
    """Write the artifact directory `out` from calibration `tokens` [n_windows, seq_len]; resumable."""
    out = Path(out)
    if out.exists() and not force:
        raise GrokquantError(f"{out} exists (use --force to overwrite)")
    ckpt = Checkpoint.open(checkpoint)
    cfg = ckpt.config
    work = out.with_name(f".{out.name}.partial")
    fp = fingerprint(ckpt, recipe, tokens)
    state_file = work / "progress.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else None
    if state is None or state.get("fingerprint") != fp:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        state = {"fingerprint": fp, "done": 0}
    n_layers = cfg.num_hidden_layers
    files = [f"model-{i + 1:05d}-of-{n_layers + 1:05d}.safetensors" for i in range(n_layers + 1)]

    model = Grok2ForCausalLM.empty(cfg, "sglang")
    if state["done"]:
        hidden = torch.load(work / "hidden.pt")
    else:
        hidden = model.embed_streamed(ckpt.tensor, tokens, batch_size)
    positions = torch.arange(tokens.shape[1])
    rope = rope_cos_sin(positions, cfg, model.sem)
    for layer in range(state["done"], n_layers):
        model.load_layer(layer, ckpt.tensor)
        stats = LayerStats(layer)
        collector = _Collector(model.model.layers[layer], stats, hessians=True)
        moe_inputs: list[torch.Tensor] = []  # the experts' input for every token, when some may need it
        keep = model.model.layers[layer].mlp.gate_proj.register_forward_pre_hook(
            lambda m, args: moe_inputs.append(args[0].reshape(-1, args[0].shape[-1]))) \
            if recipe.under_covered != "rtn" else None
        try:
            outputs = [model.run_layer(layer, h, positions, None, rope) for h in hidden]
        finally:
            collector.remove()
            if keep is not None:
                keep.remove()
        if recipe.under_covered != "rtn":
            _all_token_hessians(model.model.layers[layer], stats, recipe, model.sem.gelu, torch.cat(moe_inputs))
        result = quantize_layer(ckpt, layer, stats, recipe)
        if recipe.sequential:  # the next layer sees what the quantized layer computes
            model.load_layer(layer, lambda n: result.dequantized.get(n, ckpt.tensor(n)))
            outputs = [model.run_layer(layer, h, positions, None, rope) for h in hidden]
        hidden = outputs
        model.unload_layer(layer)
        save_file(result.tensors, str(work / files[layer]), metadata={"format": "pt"})
        torch.save(hidden, work / "hidden.tmp")
        os.replace(work / "hidden.tmp", work / "hidden.pt")
        state["done"] = layer + 1
        state["report"] = state.get("report", []) + result.report
        state_file.write_text(json.dumps(state))
        if on_layer:
            on_layer(layer)

    save_file({n: ckpt.tensor(n) for n in cfg.global_shapes()}, str(work / files[n_layers]), metadata={"format": "pt"})
    _write_metadata(work, ckpt, recipe, files)
    (work / "quantize_report.json").write_text(json.dumps(summarize(state.get("report", [])), indent=2))
    (work / "hidden.pt").unlink(missing_ok=True)
    state_file.unlink()
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    return out


def _write_metadata(work: Path, ckpt: Checkpoint, recipe: GPTQRecipe, files: list[str]) -> None:
    from safetensors import safe_open

    weight_map = {}
    for f in files:
        with safe_open(str(work / f), "pt") as sf:
            weight_map.update({k: f for k in sf.keys()})
    (work / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    qc = recipe.experts or recipe.dense_mlp or recipe.attention or IntQuantConfig()
    dynamic = {}  # GPTQModel's per-module overrides, for classes that differ from the main config
    for cls, pattern in (("attention", r"+:.*\.self_attn\..*"), ("dense_mlp", r"+:.*\.mlp\..*"),
                         ("experts", r"+:.*\.experts\..*")):
        c = recipe.config_for(cls)
        if c is None:
            dynamic["-" + pattern[1:]] = {}
        elif c != qc:
            dynamic[pattern] = {"bits": c.bits, "group_size": c.group_size, "sym": c.sym, "desc_act": c.act_order}
    quant = {"bits": qc.bits, "group_size": qc.group_size, "damp_percent": qc.damp, "desc_act": qc.act_order,
             "static_groups": qc.static_groups, "sym": qc.sym, "true_sequential": False, "quant_method": "gptq",
             "checkpoint_format": "gptq", "model_file_base_name": "model",
             "meta": {"quantizer": "grokquant", "recipe": recipe.name, "method": recipe.method}}
    if dynamic:
        quant["dynamic"] = dynamic
    (work / "quantize_config.json").write_text(json.dumps(quant, indent=2))
    config = asdict(ckpt.config)
    config["quantization_config"] = quant
    (work / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(ckpt.tokenizer_path, work / "tokenizer.tok.json")
