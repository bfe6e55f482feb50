"""Grok 2 one decoder layer at a time, a layer in parts: how every pass over the model stays below
one layer of memory (a real-width layer is 16.7 GB in float32).

`LayerStreamer.run` pushes every batch of hidden states through a layer's dense part (attention,
router, dense MLP), frees it, then through its experts a group at a time on the tokens routed to each,
loading each part's weights from `get(release_name)` and freeing them before the next part arrives.
The result is bit-identical to the whole layer's forward. Calibration, quantization, evaluation and
`streamed_logits` all run this loop; the hooks let a caller work on a part while it is in memory:

- a `Collector` on the layer counts the statistics of the first pass through each part;
- `on_dense(layer, batches)` / `on_experts(layer, experts, batches)` run after that part's forward
  (quantize rounds the part there);
- with `replay`, a hook returns the weights (a `get` function) the part's outputs should come from
  instead, and the streamer pushes the inputs through those: quantization's sequential mode, where
  layer l+1 sees the quantized layer l.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from grokquant.grok.config import expert_name
from grokquant.grok.model import Grok2ForCausalLM, rope_cos_sin
from grokquant.io.memory import release_freed_memory

Weights = Callable[[str], torch.Tensor]  # release name -> tensor


@dataclass
class MoEBatch:
    """One batch of hidden states inside a layer run in parts: what the experts need and what finishes it."""

    h: torch.Tensor  # after the attention residual [B, T, H]
    x: torch.Tensor  # MLP / MoE input, flattened [N, H]
    dense: torch.Tensor  # dense MLP output [B, T, H]
    weights: torch.Tensor  # router weights [N, k]
    ids: torch.Tensor  # router choices [N, k]
    moe: torch.Tensor  # experts' weighted sum, accumulated expert by expert [N, H] float32


class LayerStreamer:
    """A model on the meta device whose layers are loaded from `get`, run and freed one at a time."""

    def __init__(self, model: Grok2ForCausalLM, get: Weights, seq_len: int, dtype=torch.float32, device="cpu"):
        self.model, self.get, self.dtype, self.device = model, get, dtype, device
        self.positions = torch.arange(seq_len, device=device)
        self.cos, self.sin = (t.to(device) for t in rope_cos_sin(self.positions, model.cfg, model.sem))

    def embed(self, tokens: torch.Tensor, batch_size: int | None = None) -> list[torch.Tensor]:
        """Hidden states of `tokens` [B, T] in batches of sequences; the embedding is loaded only for this."""
        model = self.model
        model.assign({"model.embed_tokens.weight": self.get("model.embed_tokens.weight")}, self.dtype, "cpu")
        step = batch_size or tokens.shape[0]
        hidden = [model.embed(tokens[i:i + step]) for i in range(0, tokens.shape[0], step)]
        model.model.embed_tokens.to("meta")
        return hidden

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and output head on hidden states (loaded on first use)."""
        model = self.model
        if model.lm_head.weight.device.type == "meta":
            model.assign({n: self.get(n) for n in ("model.norm.weight", "lm_head.weight")}, self.dtype, "cpu")
        return model.head(h)

    # ---- one layer -------------------------------------------------------------------------------------
    def run(self, layer: int, hidden: list[torch.Tensor], expert_groups: Sequence[tuple[int, int]] | None = None,
            collector=None, on_dense: Callable | None = None, on_experts: Callable | None = None,
            replay: bool = False) -> list[torch.Tensor]:
        """Layer `layer` on every batch of `hidden`; returns the next layer's hidden states.

        expert_groups: [first, last) ranges of experts loaded together (default: one at a time).
        """
        model, cfg = self.model, self.model.cfg
        moe = model.model.layers[layer].block_sparse_moe
        groups = expert_groups or [(e, e + 1) for e in range(cfg.num_local_experts)]
        dense = model.dense_part(layer)
        model.load_layer(layer, self.get, self.dtype, self.device, names=dense)
        batches = self._attend(layer, hidden, collector, active=True)
        replacement = on_dense(layer, batches) if on_dense else None
        outputs = self._attend(layer, hidden, collector, active=False, weights=replacement) if replay else batches
        self._drop_dense_part(layer)
        for first, last in groups:
            experts = range(first, last)
            names = [expert_name(layer, e, p) for e in experts for p in ("w1", "w3", "w2")]
            model.load_layer(layer, self.get, self.dtype, self.device, names=names)
            self._set_active(collector, True)
            for b in batches:
                for e in experts:
                    moe.add_expert(e, b.x, b.weights, b.ids, model.sem, None if replay else b.moe)
            self._set_active(collector, False)  # what the hook pushes through the experts is not calibration
            replacement = on_experts(layer, experts, batches) if on_experts else None
            if replay:
                model.load_layer(layer, replacement, self.dtype, self.device, names=names)
                for b in outputs:
                    for e in experts:
                        moe.add_expert(e, b.x, b.weights, b.ids, model.sem, b.moe)
            for e in experts:  # this group's memory goes before the next group's arrives
                moe.experts[e].to("meta")
            release_freed_memory()
        module = model.model.layers[layer]
        out = [module.finish(b.h, b.dense, b.moe.to(b.h.dtype).view(b.h.shape), model.sem).to(h.device)
               for b, h in zip(outputs, hidden)]
        del batches, outputs
        model.unload_layer(layer)
        return out

    @staticmethod
    def _set_active(collector, active: bool) -> None:
        if collector is not None:
            collector.active = active

    def _attend(self, layer: int, hidden: list[torch.Tensor], collector, active: bool,
                weights: Weights | None = None) -> list[MoEBatch]:
        """Attention, router and dense MLP of `layer` (loaded, or reloaded from `weights`) on every batch."""
        model = self.model
        if weights is not None:
            model.load_layer(layer, weights, self.dtype, self.device, names=model.dense_part(layer))
        self._set_active(collector, active)
        module = model.model.layers[layer]
        moe = module.block_sparse_moe
        done = []
        for h in hidden:
            h1, m = module.attend(h.to(self.device), self.positions, self.cos, self.sin, None, layer, model.sem)
            x = m.reshape(-1, m.shape[-1])
            weights_, ids = moe.route(x, model.sem)
            done.append(MoEBatch(h1, x, module.mlp(m, model.sem.gelu), weights_, ids,
                                 torch.zeros(x.shape, dtype=torch.float32, device=x.device)))
        self._set_active(collector, False)
        return done

    def _drop_dense_part(self, layer: int) -> None:
        """Free the attention, dense MLP and router once every batch went through them (the norms stay)."""
        module = self.model.model.layers[layer]
        for part in (module.self_attn, module.mlp, module.block_sparse_moe.gate):
            part.to("meta")
        release_freed_memory()


@torch.no_grad()
def streamed_logits(ckpt, tokens: torch.Tensor, sem="sglang", dtype=torch.float32,
                    on_layer: Callable[[int], None] | None = None) -> torch.Tensor:
    """Logits computed loading one layer part at a time from the checkpoint: memory ~ one layer."""
    if tokens.dim() == 1:
        tokens = tokens[None]
    streamer = LayerStreamer(Grok2ForCausalLM.empty(ckpt.config, sem), ckpt.tensor, tokens.shape[1], dtype)
    hidden = streamer.embed(tokens)
    for layer in range(ckpt.config.num_hidden_layers):
        hidden = streamer.run(layer, hidden)
        if on_layer:
            on_layer(layer)
    (h,) = hidden
    return streamer.head(h)
