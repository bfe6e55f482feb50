"""`grokquant quantize`: calibrated quantization, one decoder layer at a time, resumable.

One pass over the layers: load layer l, push the calibration hidden states through it while hooks
collect each input group's statistics (experts: from the tokens the router sends them), quantize
every linear of the layer (the 8 experts of a projection in one batch), store the layer's result,
go on with the layer's outputs (the unquantized layer's, or in sequential mode the quantized
layer's). Two outputs, by recipe format:

- gptq: an auto-gptq directory (round-to-nearest or GPTQ onto integer grids, per tensor class);
- gguf: a GGUF file whose decoder-layer weights were rounded onto the GGML grids with importance
  from the calibration (`imatrix`) or with GPTQ's error compensation (`gptq`, quant/gptq_ggml.py).

Work is checkpointed per layer under `.OUT.partial` with a fingerprint of inputs and options, so a
re-run after an interruption resumes and produces the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import distributed
from .calibrate import LayerStats, _Collector
from .checkpoint import Checkpoint
from .config import expert_name
from .errors import GrokquantError
from .gguf_names import gguf_name
from .model import Grok2ForCausalLM, gelu, rope_cos_sin
from .quant.ggml import QUANTIZERS
from .quant.gptq import IntQuantConfig, IntQuantized, gptq, rtn
from .quant.gptq_ggml import ggml_rtn, gptq_ggml
from .recipe import GGUFRecipe, GPTQRecipe

FORMAT_VERSION = 2  # part of the resume fingerprint: bump when the per-layer output changes
# linear -> (statistics group, tensor class)
DENSE_LINEARS = {
    "self_attn.q_proj": ("attn_qkv", "attention"), "self_attn.k_proj": ("attn_qkv", "attention"),
    "self_attn.v_proj": ("attn_qkv", "attention"), "self_attn.o_proj": ("attn_o", "attention"),
    "mlp.gate_proj": ("mlp_gate_up", "dense_mlp"), "mlp.up_proj": ("mlp_gate_up", "dense_mlp"),
    "mlp.down_proj": ("mlp_down", "dense_mlp"),
}
EXPERT_GROUP = {"w1": "w13", "w3": "w13", "w2": "w2"}
REPORT_KEY = "grokquant.quantize_report"  # GGUF header key holding the per-class report (JSON)
Recipe = GPTQRecipe | GGUFRecipe


def fingerprint(ckpt: Checkpoint, recipe: Recipe, tokens: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(f"{FORMAT_VERSION}:{type(recipe).__name__}".encode())
    h.update(json.dumps(asdict(ckpt.config), sort_keys=True).encode())
    for f in ckpt.files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(json.dumps(asdict(recipe), sort_keys=True, default=str).encode())
    h.update(tokens.numpy().tobytes())
    return h.hexdigest()


# ---- the linears of one layer with their calibration statistics -----------------------------------------

@dataclass
class Stack:
    """Matrices quantized together: one dense linear (B = 1) or the experts of one projection."""

    cls: str  # attention | dense_mlp | experts
    names: list[str]  # release names
    W: torch.Tensor  # [B, out, in] float32
    H: torch.Tensor | None  # [B, in, in] Σxxᵀ of each matrix's inputs (when collected)
    importance: torch.Tensor  # [B, in] Σx² / tokens
    fallback: list[bool]  # under-covered matrices quantized without calibration
    min_tokens: int


def _importance(sum2: torch.Tensor, tokens: int) -> torch.Tensor:
    """Mean x² per column in float32, as llama-quantize reads an imatrix (1.0 where no token came)."""
    sum2 = sum2.float()
    return sum2 / torch.tensor(float(tokens)) if tokens > 0 else torch.ones_like(sum2)


def stack_costs(cfg) -> list[float]:
    """Relative work of each stack of a layer (GPTQ: B · in² · (out + in)), in layer_stacks' order."""
    shapes = cfg.layer_shapes(0)
    costs = [float(shapes[f"model.layers.0.{linear}.weight"][1] ** 2 * sum(shapes[f"model.layers.0.{linear}.weight"]))
             for linear in DENSE_LINEARS]
    for proj in ("w1", "w3", "w2"):
        out, inp = shapes[expert_name(0, 0, proj)]
        costs.append(float(cfg.num_local_experts * inp ** 2 * (out + inp)))
    return costs


def layer_stacks(ckpt: Checkpoint, layer: int, stats: LayerStats, recipe: Recipe,
                 weights: Callable[[str], torch.Tensor] | None = None,
                 only: set[int] | None = None) -> Iterator[tuple[int, Stack]]:
    """(index, stack) for every quantizable stack of a layer (or those in `only`), with the statistics
    the recipe's coverage policy gives it.

    `weights(name)` gives a weight (default: read from the checkpoint; the driver passes the layer it
    already loaded, so each weight is read from disk once)."""
    cfg = ckpt.config
    weights = weights or ckpt.tensor
    prefix = f"model.layers.{layer}."
    for i, (linear, (group, cls)) in enumerate(DENSE_LINEARS.items()):
        if only is not None and i not in only:
            continue
        name = prefix + linear + ".weight"
        H = stats.hessian.get(group)
        yield i, Stack(cls, [name], weights(name).float()[None], None if H is None else H[None],
                       _importance(stats.sum2[group], stats.count[group])[None], [False], stats.count[group])
    all_tokens = stats.count["mlp_gate_up"]
    for i, proj in enumerate(("w1", "w3", "w2"), start=len(DENSE_LINEARS)):
        if only is not None and i not in only:
            continue
        names = [expert_name(layer, e, proj) for e in range(cfg.num_local_experts)]
        W = torch.stack([weights(n).float() for n in names])
        Hs, imps, fallback, counts = [], [], [], []
        for e in range(cfg.num_local_experts):
            g = f"expert{e}_{EXPERT_GROUP[proj]}"
            n = stats.count.get(g, 0)
            own_H = stats.hessian.get(g, torch.zeros(W.shape[2], W.shape[2])) if stats.hessian else None
            own_s = stats.sum2.get(g, torch.zeros(W.shape[2])).float()
            covered = n >= recipe.min_tokens
            if covered or recipe.under_covered == "rtn":
                H, s, k = own_H, own_s, n
            elif recipe.under_covered == "all-tokens":
                H, s, k = stats.hessian.get(g + "_all"), stats.sum2[g + "_all"], all_tokens
            else:  # prior: the expert's own tokens plus min_tokens tokens' worth of the all-token average
                w = recipe.min_tokens / all_tokens
                H = None if own_H is None else own_H + stats.hessian[g + "_all"] * w
                s, k = own_s + stats.sum2[g + "_all"] * w, n + recipe.min_tokens
            Hs.append(H)
            imps.append(_importance(s, k))
            fallback.append(not covered and recipe.under_covered == "rtn")
            counts.append(n)
        yield i, Stack("experts", names, W, torch.stack(Hs) if Hs[0] is not None else None, torch.stack(imps),
                       fallback, min(counts))


def _all_token_statistics(layer_module, stats: LayerStats, recipe: Recipe, gelu_flavour: str,
                          m: torch.Tensor, hessians: bool) -> None:
    """Statistics of under-covered experts as if every calibration token m [N, H] were routed to them."""
    for e, expert in enumerate(layer_module.block_sparse_moe.experts):
        if stats.count.get(f"expert{e}_w13", 0) >= recipe.min_tokens:
            continue
        stats.sum2[f"expert{e}_w13_all"] = stats.sum2["mlp_gate_up"]  # the same input m, all tokens
        a = gelu(expert.w1(m), gelu_flavour) * expert.w3(m)
        stats.sum2[f"expert{e}_w2_all"] = a.pow(2).sum(0, dtype=torch.float64)
        if hessians:
            stats.hessian[f"expert{e}_w13_all"] = stats.hessian["mlp_gate_up"]
            stats.hessian[f"expert{e}_w2_all"] = a.T @ a


def _output_error(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor | None) -> float | None:
    """Σ_b ‖(W_b − Ŵ_b) X_b‖² = tr(D H Dᵀ) from the calibration Hessians."""
    if H is None:
        return None
    D = Wq - W
    return float(torch.einsum("boi,bij,boj->", D, H, D))


@dataclass
class LayerResult:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # as stored for the layer
    dequantized: dict[str, torch.Tensor] = field(default_factory=dict)  # release name -> represented weights
    report: list[dict] = field(default_factory=list)  # per stack: class, bits/type, errors, fewest tokens


# ---- gptq format: integer grids -------------------------------------------------------------------

def _int_stack(s: Stack, cfg: IntQuantConfig, method: str, device: str) -> IntQuantized:
    """Batched GPTQ with round-to-nearest for the matrices flagged as fallback."""
    W = s.W.to(device)
    if method == "rtn" or all(s.fallback):
        q = rtn(W, cfg)
    else:
        q = gptq(W, s.H.to(device), cfg)
        if any(s.fallback):
            r = rtn(W, cfg)
            for b, fb in enumerate(s.fallback):
                if fb:
                    q.codes[b], q.scales[b], q.zeros[b], q.g_idx[b] = r.codes[b], r.scales[b], r.zeros[b], r.g_idx[b]
    return IntQuantized(*(t.cpu() for t in (q.codes, q.scales, q.zeros, q.g_idx)))


def quantize_layer_int(ckpt: Checkpoint, layer: int, stats: LayerStats, recipe: GPTQRecipe,
                       device: str = "cpu", weights: Callable[[str], torch.Tensor] | None = None,
                       only: set[int] | None = None) -> LayerResult:
    """The linears of one layer (or the stacks in `only`) onto the recipe's integer grids, auto-gptq layout."""
    from .export.gptq_format import gptq_tensors, packable

    res = LayerResult()
    for i, s in layer_stacks(ckpt, layer, stats, recipe, weights, only):
        qc = recipe.config_for(s.cls)
        if qc is None or not packable(s.W.shape[1], s.W.shape[2], qc.bits):
            continue
        q = _int_stack(s, qc, recipe.method, device)
        Wq = q.dequantize()
        s.W = s.W.cpu()
        res.report.append({"stack": i, "class": s.cls, "bits": qc.bits, "error": _output_error(s.W, Wq, s.H),
                           "rtn_error": _output_error(s.W, rtn(s.W, qc).dequantize(), s.H),
                           "min_tokens": s.min_tokens})
        for b, name in enumerate(s.names):
            base = name[: -len(".weight")]
            for k, v in gptq_tensors(q, b, qc.bits).items():
                res.tensors[f"{base}.{k}"] = v
            res.dequantized[name] = Wq[b]
    return res


def _keep_unquantized(ckpt: Checkpoint, layer: int, res: LayerResult) -> None:
    for name in ckpt.config.layer_shapes(layer):
        if name not in res.dequantized:
            res.tensors[name] = ckpt.tensor(name)  # norms, router and anything not packable stay bf16


# ---- gguf format: GGML grids ----------------------------------------------------------------------

def quantize_layer_ggml(ckpt: Checkpoint, layer: int, stats: LayerStats, recipe: GGUFRecipe,
                        types: dict[str, str], weights: Callable[[str], torch.Tensor] | None = None,
                        only: set[int] | None = None) -> LayerResult:
    """The quantized GGUF tensors of one layer (types: GGUF name -> GGML type), as GGML bytes."""
    res = LayerResult()
    for i, s in layer_stacks(ckpt, layer, stats, recipe, weights, only):
        s.W = s.W.cpu()  # the GGML quantizers run on the CPU
        gname = gguf_name(s.names[0])
        type_name = types[gname]
        if type_name in ("F32", "F16", "BF16"):
            continue  # written from the checkpoint as it is
        q = QUANTIZERS[type_name]
        reference = ggml_rtn(s.W, type_name)
        if recipe.method == "gptq" and not all(s.fallback):
            data = gptq_ggml(s.W, s.H, type_name, recipe.damp)
        else:
            data = ggml_rtn(s.W, type_name, s.importance)
        for b, fb in enumerate(s.fallback):
            if fb:
                data[b] = reference[b]

        def dequant(d):
            return q.dequantize(d.reshape(-1, d.shape[-1]), s.W.shape[2]).view(s.W.shape)

        Wq = dequant(data)
        res.report.append({"stack": i, "class": s.cls, "bits": type_name, "error": _output_error(s.W, Wq, s.H),
                           "rtn_error": _output_error(s.W, dequant(reference), s.H), "min_tokens": s.min_tokens})
        res.tensors[gname] = data if len(s.names) > 1 else data[0]
        res.dequantized.update({n: Wq[b] for b, n in enumerate(s.names)})
    return res


# ---- the layer-streamed driver ----------------------------------------------------------------------------

def summarize(reports: list[dict]) -> list[dict]:
    """Per tensor class: bits, output-error reduction versus round-to-nearest, fewest tokens."""
    out = {}
    for r in reports:
        s = out.setdefault(r["class"], {"class": r["class"], "bits": r["bits"], "error": 0.0, "rtn_error": 0.0,
                                        "min_tokens": r["min_tokens"]})
        if s["bits"] != r["bits"]:
            s["bits"] = "mixed"
        if r["error"] is None or s["error"] is None:
            s["error"] = s["rtn_error"] = None
        else:
            s["error"] += r["error"]
            s["rtn_error"] += r["rtn_error"]
        s["min_tokens"] = min(s["min_tokens"], r["min_tokens"])
    for s in out.values():
        s["reduction_vs_rtn"] = 1 - s["error"] / s["rtn_error"] if s["rtn_error"] else None
    return list(out.values())


def _gguf_types(ckpt: Checkpoint, recipe: GGUFRecipe) -> dict[str, str]:
    from .export.gguf import plan

    return {t.name: t.type.name for t in plan(ckpt.config, recipe, has_imatrix=True)}


@torch.no_grad()
def quantize(checkpoint: str | Path, out: str | Path, recipe: Recipe, tokens: torch.Tensor, force: bool = False,
             batch_size: int = 8, device: str = "cpu", rope: str = "plain",
             on_layer: Callable[[int], None] | None = None) -> Path:
    """Write `out` (a GPTQ directory or a GGUF file) from calibration `tokens` [n_windows, seq_len].

    Under torch.distributed (see grokquant/distributed.py) every rank calls this with the same
    arguments; the layers' quantization work is split among them and rank 0 writes.
    """
    group = distributed.current()
    out = Path(out)
    if out.exists() and not force:
        raise GrokquantError(f"{out} exists (use --force to overwrite)")
    if isinstance(recipe, GGUFRecipe) and not recipe.calibrated:
        raise GrokquantError(f"recipe {recipe.name} is not calibrated (method reference): use `grokquant convert`")
    ckpt = Checkpoint.open(checkpoint)
    cfg = ckpt.config
    gguf = isinstance(recipe, GGUFRecipe)
    types = _gguf_types(ckpt, recipe) if gguf else {}
    hessians = not gguf or recipe.method == "gptq"
    work = out.with_name(f".{out.name}.partial")
    state_file = work / "progress.json"
    state, hidden = None, None
    if group.is_main:
        fp = fingerprint(ckpt, recipe, tokens)
        state = json.loads(state_file.read_text()) if state_file.exists() else None
        if state is None or state.get("fingerprint") != fp:
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
            state = {"fingerprint": fp, "done": 0, "report": []}
        if state["done"]:
            hidden = torch.load(work / "hidden.pt")
    state = group.broadcast(state)
    n_layers = cfg.num_hidden_layers
    parts = [f"model-{i + 1:05d}-of-{n_layers + 1:05d}.safetensors" for i in range(n_layers + 1)]
    owner = distributed.assign(stack_costs(cfg), group.world)
    mine = {i for i, r in enumerate(owner) if r == group.rank}

    model = Grok2ForCausalLM.empty(cfg, "sglang")
    if state["done"]:
        hidden = group.broadcast(hidden)
    else:
        hidden = model.embed_streamed(ckpt.tensor, tokens, batch_size)
    positions = torch.arange(tokens.shape[1], device=device)
    rope_tables = tuple(t.to(device) for t in rope_cos_sin(positions, cfg, model.sem))

    def run(layer):
        return [model.run_layer(layer, h.to(device), positions, None, rope_tables).cpu() for h in hidden]

    for layer in range(state["done"], n_layers):
        model.load_layer(layer, ckpt.tensor, torch.float32, device)
        stats = LayerStats(layer)
        module = model.model.layers[layer]
        collector = _Collector(module, stats, hessians=hessians)
        moe_inputs: list[torch.Tensor] = []  # the experts' input for every token, when some may need it
        keep = module.mlp.gate_proj.register_forward_pre_hook(
            lambda m, args: moe_inputs.append(args[0].reshape(-1, args[0].shape[-1]))) \
            if recipe.under_covered != "rtn" else None
        try:
            outputs = run(layer)
        finally:
            collector.remove()
            if keep is not None:
                keep.remove()
        if keep is not None:
            _all_token_statistics(module, stats, recipe, model.sem.gelu, torch.cat(moe_inputs), hessians)
        stats.hessian = {k: v.cpu() for k, v in stats.hessian.items()}
        stats.sum2 = {k: v.cpu() for k, v in stats.sum2.items()}
        prefix = f"model.layers.{layer}."

        def loaded(name):  # the weights already in memory for the forward pass
            return module.get_parameter(name[len(prefix):]).detach()

        if gguf:
            result = quantize_layer_ggml(ckpt, layer, stats, recipe, types, loaded, mine)
        else:
            result = quantize_layer_int(ckpt, layer, stats, recipe, device, loaded, mine)
        del stats
        results = group.gather(result, everywhere=recipe.sequential)
        if results is not None:
            result = _merge(results)
            if not gguf:
                _keep_unquantized(ckpt, layer, result)
        if recipe.sequential:  # the next layer sees what the quantized layer computes
            model.load_layer(layer, lambda n: result.dequantized.get(n, ckpt.tensor(n)), torch.float32, device)
            outputs = run(layer)
        hidden = outputs
        model.unload_layer(layer)
        state["done"] = layer + 1
        state["report"] += result.report if group.is_main else []
        if group.is_main:
            save_file(result.tensors, str(work / parts[layer]), metadata={"format": "pt"})
            torch.save(hidden, work / "hidden.tmp")
            os.replace(work / "hidden.tmp", work / "hidden.pt")
            state_file.write_text(json.dumps(state))
        del result, results
        if on_layer:
            on_layer(layer)

    if group.is_main:
        report = summarize(state["report"])
        if gguf:
            _assemble_gguf(ckpt, checkpoint, work, parts[:n_layers], out, recipe, rope, report)
        else:
            _finish_gptq(ckpt, work, parts, out, recipe, report)
    group.barrier()  # every rank returns once the output is in place
    return out


def _merge(results: list[LayerResult]) -> LayerResult:
    """One layer's result from the ranks' parts, in stack order (as a single process makes it)."""
    merged = LayerResult()
    for part in results:
        merged.tensors.update(part.tensors)
        merged.dequantized.update(part.dequantized)
        merged.report += part.report
    merged.report.sort(key=lambda r: r["stack"])
    order = {n: i for i, n in enumerate(sorted(merged.tensors))}
    merged.tensors = dict(sorted(merged.tensors.items(), key=lambda kv: order[kv[0]]))
    return merged


def read_report(artifact: str | Path) -> list[dict]:
    """The per-class report of a quantized artifact (GPTQ directory or GGUF file)."""
    artifact = Path(artifact)
    if artifact.is_dir():
        return json.loads((artifact / "quantize_report.json").read_text())
    from .gguf_file import read_gguf

    f = read_gguf(artifact)
    try:
        return json.loads(f.metadata[REPORT_KEY])
    finally:
        f.close()


def _finish_gptq(ckpt: Checkpoint, work: Path, parts: list[str], out: Path, recipe: GPTQRecipe,
                 report: list[dict]) -> None:
    from .export.gptq_format import write_metadata

    save_file({n: ckpt.tensor(n) for n in ckpt.config.global_shapes()}, str(work / parts[-1]),
              metadata={"format": "pt"})
    write_metadata(work, ckpt, recipe, parts)
    (work / "quantize_report.json").write_text(json.dumps(report, indent=2))
    (work / "hidden.pt").unlink(missing_ok=True)
    (work / "progress.json").unlink()
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)


def _assemble_gguf(ckpt: Checkpoint, checkpoint, work: Path, parts: list[str], out: Path, recipe: GGUFRecipe,
                   rope: str, report: list[dict]) -> None:
    """The GGUF file from the per-layer GGML bytes (globals and float tensors from the checkpoint)."""
    from .export.gguf import convert

    handles = [safe_open(str(work / p), "pt") for p in parts]
    where = {k: h for h in handles for k in h.keys()}

    def prequantized(t) -> np.ndarray | None:
        return where[t.name].get_tensor(t.name).numpy() if t.name in where else None

    tmp_out = out.with_name(f".{out.name}.assemble")
    convert(checkpoint, tmp_out, recipe, rope=rope, force=True, prequantized=prequantized,
            extra_metadata={REPORT_KEY: json.dumps(report), "grokquant.recipe": recipe.name})
    if out.exists() and out.is_dir():
        shutil.rmtree(out)
    os.replace(tmp_out, out)
    del handles, where
    shutil.rmtree(work)
