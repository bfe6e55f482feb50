"""Layer-streamed calibration: push calibration tokens through the model one decoder layer at a
time and collect, for every linear input, the diagonal statistics (Σx², the importance matrix) and
optionally the full Hessian Σxxᵀ that GPTQ uses.

Inputs that share a matrix share statistics: q/k/v (one), dense gate/up (one), and per expert
w1/w3 (one, from the tokens the router sends to that expert); each expert's w2 sees that expert's
own intermediate activations. A layer runs in parts: attention, router and dense MLP for every batch,
then one expert at a time on the tokens routed to it (bit-identical to the whole layer's forward).
Memory: the dense part's weights or one expert's, the hidden states of all calibration tokens, and
the statistics of one layer.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from grokquant.grok.checkpoint import Checkpoint
from grokquant.grok.model import Grok2ForCausalLM
from grokquant.grok.streaming import LayerStreamer
from grokquant.grok.names import DENSE_LINEARS, EXPERTS, expert_group, input_group

@dataclass
class LayerStats:
    layer: int
    sum2: dict[str, torch.Tensor] = field(default_factory=dict)  # group -> Σx² per input column
    count: dict[str, int] = field(default_factory=dict)  # group -> rows (tokens) seen
    hessian: dict[str, torch.Tensor] = field(default_factory=dict)  # group -> Σxxᵀ (when collected)
    with_hessians: bool = False  # collected (entries may since have been handed to the quantizers)

    def expert_tokens(self, n_experts: int) -> list[int]:
        return [self.count.get(expert_group(e, "w13"), 0) for e in range(n_experts)]

    def drop_hessians(self, groups) -> None:
        """Hand back the memory of Hessians no one needs any more."""
        for g in groups:
            self.hessian.pop(g, None)


class Collector:
    """Forward pre-hooks on one decoder layer's linears that accumulate their inputs' statistics: one
    hook per statistics group, on its first linear (q/k/v, gate/up and w1/w3 see the same input)."""

    def __init__(self, layer_module: torch.nn.Module, stats: LayerStats, hessians: bool):
        self.stats, self.hessians, self.handles = stats, hessians, []
        self.active = True  # False: forward passes that must not count (e.g. through quantized weights)
        hooked = set()
        for name, module in layer_module.named_modules():
            group = input_group(name)
            if group is not None and group not in hooked:
                hooked.add(group)
                self.handles.append(module.register_forward_pre_hook(self._hook(group)))

    def _hook(self, group: str):
        def hook(module, args):
            if not self.active:
                return
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            s = self.stats
            if group not in s.sum2:
                s.sum2[group] = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
                s.count[group] = 0
                if self.hessians:
                    s.hessian[group] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            s.sum2[group] += x.pow(2).sum(0, dtype=torch.float64)
            s.count[group] += x.shape[0]
            if self.hessians:
                s.hessian[group].addmm_(x.t(), x)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def collect(ckpt: Checkpoint, tokens: torch.Tensor, semantics: str = "sglang", hessians: bool = False,
            batch_size: int = 8, device: str = "cpu",
            on_layer: Callable[[LayerStats], None] | None = None) -> Iterator[LayerStats]:
    """Yield each layer's statistics in turn (drop a layer's Hessians before asking for the next).

    tokens: [n_sequences, seq_len]. The hidden states of layer l+1 come from the unquantized layer l
    (the fast, independent mode).
    """
    for stats, _ in layer_statistics(ckpt, tokens, semantics, hessians, batch_size, device, on_layer=on_layer):
        yield stats


def layer_statistics(ckpt: Checkpoint, tokens: torch.Tensor, semantics: str = "sglang", hessians: bool = False,
                     batch_size: int = 8, device: str = "cpu", start: int = 0, hidden: list[torch.Tensor] | None = None,
                     on_layer: Callable[[LayerStats], None] | None = None
                     ) -> Iterator[tuple[LayerStats, list[torch.Tensor]]]:
    """(statistics, the hidden states it produced) of each layer from `start`, whose input is `hidden`
    (a resumed run's; the embedded tokens when start is 0)."""
    cfg = ckpt.config
    model = Grok2ForCausalLM.empty(cfg, semantics)
    streamer = LayerStreamer(model, ckpt.tensor, tokens.shape[1], device=device)
    hidden = streamer.embed(tokens, batch_size) if start == 0 else hidden
    for layer in range(start, cfg.num_hidden_layers):
        stats = LayerStats(layer, with_hessians=hessians)
        collector = Collector(model.model.layers[layer], stats, hessians)
        try:
            hidden = streamer.run(layer, hidden, collector=collector)
        finally:
            collector.remove()
        stats.sum2 = {k: v.float().cpu() for k, v in stats.sum2.items()}
        stats.hessian = {k: v.cpu() for k, v in stats.hessian.items()}
        if on_layer:
            on_layer(stats)
        yield stats, hidden


# ---- importance matrix and coverage -------------------------------------------------------------------

def imatrix_entries(stats: LayerStats, n_experts: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """GGUF weight name -> (Σx² [n_mat, n], counts [n_mat]) in llama.cpp's imatrix layout."""
    blk = f"blk.{stats.layer}."
    out = {}
    for t in DENSE_LINEARS:
        if t.group in stats.sum2:
            out[blk + t.gguf] = (stats.sum2[t.group][None], torch.tensor([float(stats.count[t.group])]))
    for kind in ("w13", "w2"):
        groups = [expert_group(e, kind) for e in range(n_experts)]
        width = next((stats.sum2[g].numel() for g in groups if g in stats.sum2), None)
        if width is None:
            continue  # no expert of this layer saw a token
        sums = torch.stack([stats.sum2.get(g, torch.zeros(width)) for g in groups])
        counts = torch.tensor([float(stats.count.get(g, 0)) for g in groups])
        for t in EXPERTS:
            if t.group == kind:
                out[blk + t.gguf] = (sums, counts)
    return out


def coverage_problems(per_layer: list[list[int]], min_tokens: int) -> list[tuple[int, int, int]]:
    """(layer, expert, tokens) for every expert that saw fewer than `min_tokens` tokens."""
    return [(l, e, n) for l, counts in enumerate(per_layer) for e, n in enumerate(counts) if n < min_tokens]


def render_coverage(per_layer: list[list[int]], min_tokens: int) -> str:
    n_exp = len(per_layer[0]) if per_layer else 0
    lines = ["tokens per expert (rows: layers; * = below --min-tokens %d)" % min_tokens,
             "layer " + "".join(f"{f'e{e}':>8}" for e in range(n_exp))]
    for l, counts in enumerate(per_layer):
        lines.append(f"{l:>5} " + "".join(f"{n:>7}{'*' if n < min_tokens else ' '}" for n in counts))
    return "\n".join(lines)


def save_stats(path, all_stats: list[LayerStats], metadata: dict) -> None:
    """Statistics of every layer as safetensors: layers.L.GROUP.{sum2,count[,hessian]}."""
    import json

    from safetensors.torch import save_file

    save_file(stats_tensors(all_stats), str(path), metadata={"grokquant": json.dumps(metadata)})


def stats_tensors(all_stats: list[LayerStats]) -> dict[str, torch.Tensor]:
    tensors = {}
    for s in all_stats:
        for group, v in s.sum2.items():
            tensors[f"layers.{s.layer}.{group}.sum2"] = v.float().contiguous()
            tensors[f"layers.{s.layer}.{group}.count"] = torch.tensor([s.count[group]], dtype=torch.int64)
        for group, h in s.hessian.items():
            tensors[f"layers.{s.layer}.{group}.hessian"] = h.contiguous()
    return tensors


def load_stats(path) -> list[LayerStats]:
    from safetensors import safe_open

    by_layer: dict[int, LayerStats] = {}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            _, layer, group, kind = key.split(".")
            s = by_layer.setdefault(int(layer), LayerStats(int(layer)))
            t = f.get_tensor(key)
            if kind == "sum2":
                s.sum2[group] = t
            elif kind == "count":
                s.count[group] = int(t.item())
            else:
                s.hessian[group] = t
    return [by_layer[k] for k in sorted(by_layer)]


def check_request(checkpoint, output, imatrix_out=None, force: bool = False, batch_size: int = 8) -> None:
    """Refuse outputs `calibrate` must not write (existing without force, the input, one file twice) and
    batch sizes below one, before any work."""
    from grokquant.errors import GrokquantError
    from grokquant.io.paths import check_output

    for p in (output, imatrix_out):
        if p:
            check_output(p, [checkpoint], directory=False, force=force)
    if imatrix_out and Path(imatrix_out).resolve() == Path(output).resolve():
        raise GrokquantError(f"--imatrix {imatrix_out} is the statistics output: name another file")
    if batch_size < 1:
        raise GrokquantError(f"batch size {batch_size}: at least 1")


def calibrate(checkpoint, output, tokens: torch.Tensor, imatrix_out=None, hessians: bool = False,
              batch_size: int = 8, device: str = "cpu", force: bool = False, dataset: str = "", metadata: dict | None = None,
              on_layer: Callable[[LayerStats], None] | None = None) -> list[list[int]]:
    """Collect statistics for every layer, write `output` (and the GGUF imatrix); returns tokens per
    expert per layer. `output` is for inspection and other tools (`load_stats`); the imatrix feeds
    `convert --imatrix` or llama-quantize. `quantize` collects its own statistics with `Collector`.
    Each finished layer is kept in `.OUTPUT.partial` (io/layer_work.py), so an interrupted run resumes at
    the next; both files are written under temporary names and renamed when both are complete."""
    from contextlib import nullcontext

    from grokquant.calibrate.imatrix import save_imatrix
    from grokquant.io.layer_work import LayerWork
    from grokquant.io.paths import output_lock, replacing

    check_request(checkpoint, output, imatrix_out, force, batch_size)
    ckpt = Checkpoint.open(checkpoint)
    n_layers, n_experts = ckpt.config.num_hidden_layers, ckpt.config.num_local_experts
    work = LayerWork(Path(output))
    with output_lock(work.out):
        try:
            state = work.start(_fingerprint(ckpt, tokens, hessians, batch_size, device))
            hidden = work.hidden() if state["done"] else None
            layers = layer_statistics(ckpt, tokens, hessians=hessians, batch_size=batch_size, device=device,
                                      start=state["done"], hidden=hidden, on_layer=on_layer)
            all_stats = [load_stats(work.dir / _layer_file(layer))[0] for layer in range(state["done"])]
            for stats in all_stats:  # the finished layers of an interrupted run, exactly as they were
                if on_layer:
                    on_layer(stats)
            for stats, hidden in layers:
                layer_file = work.save_tensors(_layer_file(stats.layer), stats_tensors([stats]))
                state["done"] = stats.layer + 1
                work.commit(state, hidden, [layer_file])
                all_stats.append(stats)
            sums, counts = {}, {}
            for stats in all_stats:
                for name, (s, c) in imatrix_entries(stats, n_experts).items():
                    sums[name], counts[name] = s, c
            meta = {"checkpoint": str(checkpoint), "data": dataset, "tokens": int(tokens.numel()),
                    "seq_len": int(tokens.shape[1]), **(metadata or {})}
            with replacing(output) as tmp, (replacing(imatrix_out) if imatrix_out else nullcontext()) as imatrix_tmp:
                save_stats(tmp, all_stats, meta)
                if imatrix_out:
                    save_imatrix(imatrix_tmp, sums, counts, [dataset], tokens.shape[0], tokens.shape[1])
        except BaseException as exc:
            work.after_failure(exc, n_layers)
            raise
        finally:
            ckpt.close()
        shutil.rmtree(work.dir, ignore_errors=True)  # under the lock: a run starting now finds nothing half-removed
    return [s.expert_tokens(n_experts) for s in all_stats]


FORMAT_VERSION = 1  # part of the resume fingerprint: bump when the statistics for the same inputs change


def _fingerprint(ckpt: Checkpoint, tokens: torch.Tensor, hessians: bool, batch_size: int, device: str) -> str:
    """What the statistics' bytes depend on (the batch size and device change the order of the sums)."""
    h = hashlib.sha256(f"calibrate {FORMAT_VERSION}:{hessians}:{batch_size}:{device}".encode())
    h.update(ckpt.identity().encode())
    h.update(tokens.numpy().tobytes())
    return h.hexdigest()


def _layer_file(layer: int) -> str:
    return f"layer-{layer:05d}.safetensors"
