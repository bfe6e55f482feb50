"""`grokquant quantize`: calibrated quantization, one decoder layer at a time, resumable.

One pass over the layers. For layer l: load its attention, dense MLP and router, push every batch of
calibration hidden states through them while hooks collect each input group's statistics, and
quantize those linears; then visit the experts in groups (all 8 at once by default, fewer to bound
memory at real widths): load the group, run it on the tokens the router sends each expert
(statistics from exactly those tokens), quantize its projections (one batch per projection), free
it. The layer's outputs feed layer l+1 (the unquantized layer's, or in sequential mode the
quantized layer's). Two outputs, by recipe format:

- gptq: an auto-gptq directory (round-to-nearest or GPTQ onto integer grids, per tensor class);
- gguf: a GGUF file whose decoder-layer weights were rounded onto the GGML grids with importance
  from the calibration (`imatrix`) or with GPTQ's error compensation (`gptq`, quant/gptq_ggml.py).

Work is checkpointed per layer under `.OUT.partial` with a fingerprint of inputs and options, so a
re-run after an interruption resumes and produces the same bytes. Under torchrun the stacks of a
layer are split among the ranks (grokquant/distributed.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from grokquant.quantize import distributed
from grokquant.calibrate.statistics import Collector, LayerStats
from grokquant.grok.checkpoint import Checkpoint
from grokquant.grok.config import GrokConfig
from grokquant.errors import GrokquantError
from grokquant.io.layer_work import HIDDEN_FILE, STATE_FILE, LayerWork
from grokquant.io.paths import check_output, output_lock, write_json_durably
from grokquant.grok.model import Grok2ForCausalLM
from grokquant.grok.names import expert_groups, gguf_tensors
from grokquant.grok.streaming import LayerStreamer
from grokquant.quantize.items import (Item, LayerResult, Recipe, all_token_statistics, item_cost, join_ggml, layer_items,
                             quantize_items)
from grokquant.quantize.recipe import GGUFRecipe, GPTQRecipe

FORMAT_VERSION = 6  # part of the resume fingerprint: bump when the per-layer output changes
REPORT_KEY = "grokquant.quantize_report"  # GGUF header key holding the per-class report (JSON)
ALLOCATION_KEY = "grokquant.allocation"  # GGUF header key: the --target-bpw choice per tensor (JSON)


def fingerprint(ckpt: Checkpoint, recipe: Recipe, tokens: torch.Tensor, expert_batch: int) -> str:
    h = hashlib.sha256()
    h.update(f"{FORMAT_VERSION}:{type(recipe).__name__}:{expert_batch}".encode())
    h.update(ckpt.identity().encode())
    h.update(json.dumps(asdict(recipe), sort_keys=True, default=str).encode())
    h.update(tokens.numpy().tobytes())
    return h.hexdigest()


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
    from grokquant.gguf.convert import plan

    return {t.name: t.type.name for t in plan(ckpt.config, recipe, has_imatrix=True)}


def _exchange(group: distributed.Group, results: Iterable[LayerResult], everywhere: bool) -> LayerResult | None:
    """This rank's results joined with every other rank's, in item order (None on ranks that get nothing)."""
    local = LayerResult()
    for r in results:
        if not everywhere:  # only the names are needed from here on (at real width a gigabyte per linear)
            r.dequantized = dict.fromkeys(r.dequantized)
        local.add(r)
    parts = group.gather(local, everywhere)
    if parts is None:
        return None
    merged = LayerResult()
    for part in parts:
        merged.add(part)
    merged.report.sort(key=lambda r: r["stack"])
    merged.tensors = dict(sorted(merged.tensors.items()))
    return merged


def _allocation(ckpt: Checkpoint, recipe: GGUFRecipe, tokens: torch.Tensor, work: Path, batch_size: int,
                on_probe: Callable[[int, int], None] | None) -> list[dict]:
    """The per-tensor types for recipe.target_bpw: measured once, kept in the work folder for a resumed run."""
    from grokquant.quantize import allocate

    path = work / "allocation.json"
    if path.exists():
        return json.loads(path.read_text())
    planned = _gguf_types(ckpt, recipe)
    fixed = {g for g in planned if recipe.override_for(g) is not None}
    free = allocate.allocatable(ckpt, fixed)
    shapes = dict(gguf_tensors(ckpt.config))
    budget = allocate.budget_bytes(shapes, recipe.target_bpw, planned, {g for g, _ in free})
    allocate.check_budget(dict(free), budget)
    progress = (lambda done: on_probe(done, len(free))) if on_probe else None
    sens = allocate.measure(ckpt, tokens, fixed, batch_size, progress)
    report = allocate.allocation_report(sens, allocate.allocate(sens, shapes, budget))
    write_json_durably(path, report)
    return report


def check_request(recipe: Recipe, cfg: GrokConfig | None = None, batch_size: int = 8,
                  expert_batch: int | None = None) -> None:
    """Refuse what `quantize` would not run: the recipe, and with the model's `cfg` its group sizes and the
    batch sizes (callers may check before preparing calibration data)."""
    if isinstance(recipe, GGUFRecipe) and not recipe.calibrated:
        raise GrokquantError(f"recipe {recipe.name} is not calibrated (method reference): use `grokquant convert`")
    if batch_size < 1:
        raise GrokquantError(f"batch size {batch_size}: at least 1")
    if cfg is None:
        return
    if isinstance(recipe, GPTQRecipe):
        recipe.check_widths(cfg)
    if expert_batch is not None and not 1 <= expert_batch <= cfg.num_local_experts:
        raise GrokquantError(f"expert batch {expert_batch}: between 1 and {cfg.num_local_experts}")


@torch.no_grad()
def quantize(checkpoint: str | Path, out: str | Path, recipe: Recipe, tokens: torch.Tensor, force: bool = False,
             batch_size: int = 8, device: str = "cpu", rope: str = "plain", expert_batch: int | None = None,
             on_layer: Callable[[int], None] | None = None, on_probe: Callable[[int, int], None] | None = None
             ) -> Path:
    """Write `out` (a GPTQ directory or a GGUF file) from calibration `tokens` [n_windows, seq_len].

    expert_batch: experts loaded and quantized together (default all; 1 bounds memory to one expert).
    A GGUF recipe with target_bpw first measures every tensor's sensitivity (on_probe(done, total)) and
    chooses the per-tensor types (quantize/allocate.py); the choice is kept for a resumed run.
    Under torch.distributed every rank calls this with the same arguments; rank 0 writes.
    """
    group = distributed.current()
    out = check_output(out, [checkpoint], directory=not isinstance(recipe, GGUFRecipe), force=force)
    ckpt = Checkpoint.open(checkpoint)
    check_request(recipe, ckpt.config, batch_size, expert_batch)
    expert_batch = ckpt.config.num_local_experts if expert_batch is None else expert_batch
    work = LayerWork(out)
    # one run per output (rank 0 alone touches the files); the lock goes with the process, kill -9 included
    with output_lock(out) if group.is_main else nullcontext():
        try:
            _quantize(ckpt, checkpoint, out, work, recipe, tokens, group, batch_size, device, rope, expert_batch,
                      on_layer, on_probe)
        except BaseException as exc:
            if group.is_main:  # the measured allocation is worth keeping too
                work.after_failure(exc, ckpt.config.num_hidden_layers, (work.dir / "allocation.json").exists())
            raise
    group.barrier()  # every rank returns once the output is in place
    return out


def _quantize(ckpt: Checkpoint, checkpoint, out: Path, work: LayerWork, recipe: Recipe, tokens: torch.Tensor,
              group: distributed.Group, batch_size: int, device: str, rope: str, expert_batch: int,
              on_layer: Callable[[int], None] | None, on_probe: Callable[[int, int], None] | None) -> None:
    cfg = ckpt.config
    gguf = isinstance(recipe, GGUFRecipe)
    hessians = not gguf or recipe.method == "gptq"
    state, hidden = None, None
    if group.is_main:
        state = work.start(fingerprint(ckpt, recipe, tokens, expert_batch))
        state.setdefault("report", [])
        if state["done"]:
            hidden = work.hidden()
    state = group.broadcast(state)
    allocation = None
    if gguf and recipe.target_bpw is not None and not recipe.tensor_types:
        if group.is_main:
            allocation = _allocation(ckpt, recipe, tokens, work.dir, batch_size, on_probe)
        allocation = group.broadcast(allocation)
        recipe = replace(recipe, tensor_types={a["tensor"]: a["type"] for a in allocation})
    types = _gguf_types(ckpt, recipe) if gguf else {}
    n_layers = cfg.num_hidden_layers
    parts = [f"model-{i + 1:05d}-of-{n_layers + 1:05d}.safetensors" for i in range(n_layers + 1)]
    items = layer_items(cfg, expert_batch)
    owner = distributed.assign([item_cost(cfg, it) for it in items], group.world)

    streamer = LayerStreamer(Grok2ForCausalLM.empty(cfg, "sglang"), ckpt.tensor, tokens.shape[1], device=device)
    hidden = group.broadcast(hidden) if state["done"] else streamer.embed(tokens, batch_size)
    run = _Run(ckpt, recipe, streamer, group, items, owner, types, device, hessians)

    for layer in range(state["done"], n_layers):
        written, hidden = _quantize_layer(run, layer, hidden)
        state["done"] = layer + 1
        if group.is_main:
            if gguf:
                tensors = join_ggml(written.tensors)
            else:
                tensors = written.tensors
                for name in cfg.layer_shapes(layer):
                    if name not in written.dequantized:  # norms, router and anything not packable stay bf16
                        tensors[name] = ckpt.tensor(name)
            layer_file = work.save_tensors(parts[layer], tensors, metadata={"format": "pt"})
            state["report"] += written.report
            work.commit(state, hidden, [layer_file])
        del written
        if on_layer:
            on_layer(layer)

    if group.is_main:
        report = summarize(state["report"])
        if gguf:
            _assemble_gguf(ckpt, checkpoint, work.dir, parts[:n_layers], out, recipe, rope, report, allocation)
        else:
            _finish_gptq(ckpt, work.dir, parts, out, recipe, report)


@dataclass
class _Run:
    """What every layer of one quantize() call shares."""

    ckpt: Checkpoint
    recipe: Recipe
    streamer: LayerStreamer
    group: distributed.Group
    items: list[Item]
    owner: list[int]  # rank of each item
    types: dict[str, str]  # GGUF name -> GGML type (gguf recipes)
    device: str
    hessians: bool

    def mine(self, selected: Iterable[Item]) -> list[Item]:
        return [it for it in selected if self.owner[it.index] == self.group.rank]


def _to_cpu(stats: LayerStats) -> None:
    """The quantizers take the statistics from the CPU (GGML rounding runs there)."""
    stats.hessian = {k: v.cpu() for k, v in stats.hessian.items()}
    stats.sum2 = {k: v.cpu() for k, v in stats.sum2.items()}


def _quantize_layer(run: _Run, layer: int, hidden: list[torch.Tensor]) -> tuple[LayerResult, list[torch.Tensor]]:
    """One decoder layer: (what rank 0 stores for it, the hidden states for the next layer).

    The streamer runs the layer's dense part, then each group of experts; after each part's forward
    pass the hooks below quantize it while its weights are in memory, and in sequential mode hand back
    the quantized weights for the outputs that feed the next layer."""
    ckpt, recipe, model = run.ckpt, run.recipe, run.streamer.model
    module = model.model.layers[layer]
    prefix = f"model.layers.{layer}."
    stored = ckpt.dtype(model.dense_part(layer)[0])
    stats = LayerStats(layer, with_hessians=run.hessians)
    written = LayerResult()  # what rank 0 stores for this layer

    def loaded(name):  # the weights already in memory for the forward pass: each is read from disk once
        return module.get_parameter(name[len(prefix):]).detach()

    def quantize_part(selected: list[Item], *modules):
        for m in modules:  # past the forward pass the weights are only read: the file's dtype holds them
            m.to(stored)    # exactly, in half the memory of float32
        _to_cpu(stats)
        res = _exchange(run.group, quantize_items(run.mine(selected), layer, stats, recipe, loaded, run.types,
                                                  run.device), recipe.sequential)
        if res is not None:
            written.add(res)
            return lambda n: res.dequantized[n] if n in res.dequantized else ckpt.tensor(n)
        return ckpt.tensor

    def on_dense(layer, batches):
        replacement = quantize_part([it for it in run.items if it.linear], module.self_attn, module.mlp)
        # done with these; mlp_gate_up is every token's MoE input Hessian, which the coverage policies use
        stats.drop_hessians(("attn_qkv", "attn_o", "mlp_down") + (("mlp_gate_up",) if recipe.under_covered == "rtn"
                                                                  else ()))
        return replacement

    def on_experts(layer, experts, batches):
        if recipe.under_covered != "rtn":
            all_token_statistics(module, experts, stats, recipe, model.sem.gelu, torch.cat([b.x for b in batches]),
                                 run.hessians)
        moe = module.block_sparse_moe
        replacement = quantize_part([it for it in run.items if it.experts == (experts.start, experts.stop)],
                                    *(moe.experts[e] for e in experts))
        for e in experts:
            stats.drop_hessians(expert_groups(e))
        return replacement

    groups = sorted({it.experts for it in run.items if it.proj is not None})
    collector = Collector(module, stats, hessians=run.hessians)
    try:
        hidden = run.streamer.run(layer, hidden, groups, collector, on_dense, on_experts, replay=recipe.sequential)
    finally:
        collector.remove()
    return written, [h.cpu() for h in hidden]


def read_report(artifact: str | Path) -> list[dict]:
    """The per-class report of a quantized artifact (GPTQ directory or GGUF file)."""
    artifact = Path(artifact)
    if artifact.is_dir():
        return json.loads((artifact / "quantize_report.json").read_text())
    from grokquant.gguf.file import read_gguf

    f = read_gguf(artifact)
    try:
        return json.loads(f.metadata[REPORT_KEY])
    finally:
        f.close()


def render_report(report: list[dict]) -> str:
    """The per-class report as a table: bits, calibration error against round-to-nearest, fewest tokens."""
    lines = [f"{'class':<12}{'bits':>7}{'calib. error vs RTN':>21}{'fewest tokens':>15}"]
    for row in report:
        change = "—" if row["reduction_vs_rtn"] is None else f"{-100 * row['reduction_vs_rtn']:.1f}%"
        lines.append(f"{row['class']:<12}{row['bits']:>7}{change:>21}{row['min_tokens']:>15}")
    return "\n".join(lines)


def _finish_gptq(ckpt: Checkpoint, work: Path, parts: list[str], out: Path, recipe: GPTQRecipe,
                 report: list[dict]) -> None:
    from grokquant.gptq.writer import write_metadata

    save_file({n: ckpt.tensor(n) for n in ckpt.config.global_shapes()}, str(work / parts[-1]),
              metadata={"format": "pt"})
    write_metadata(work, ckpt, recipe, parts)
    (work / "quantize_report.json").write_text(json.dumps(report, indent=2))
    (work / HIDDEN_FILE).unlink(missing_ok=True)
    (work / STATE_FILE).unlink()
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)


def _assemble_gguf(ckpt: Checkpoint, checkpoint, work: Path, parts: list[str], out: Path, recipe: GGUFRecipe,
                   rope: str, report: list[dict], allocation: list[dict] | None) -> None:
    """The GGUF file from the per-layer GGML bytes (globals and float tensors from the checkpoint)."""
    from grokquant.gguf.convert import convert

    handles = [safe_open(str(work / p), "pt") for p in parts]
    where = {k: h for h in handles for k in h.keys()}

    def prequantized(t) -> np.ndarray | None:
        return where[t.name].get_tensor(t.name).numpy() if t.name in where else None

    tmp_out = out.with_name(f".{out.name}.assemble")
    extra = {REPORT_KEY: json.dumps(report), "grokquant.recipe": recipe.name}
    if allocation is not None:
        extra[ALLOCATION_KEY] = json.dumps({"target_bpw": recipe.target_bpw, "tensors": allocation},
                                           separators=(",", ":"))
    convert(checkpoint, tmp_out, recipe, rope=rope, force=True, prequantized=prequantized, extra_metadata=extra)
    if out.exists() and out.is_dir():
        shutil.rmtree(out)
    os.replace(tmp_out, out)
    where.clear()  # the per-layer files are closed before their folder goes
    handles.clear()
    shutil.rmtree(work)
