"""Carrying out a `Placement` at run time: offloaded weights visit the GPU that computes with them.

Offloaded weights sit in pinned CPU memory and visit the layer's GPU when used: a layer's dense
part is prefetched on a side stream while the layer before it runs; experts are fetched once
routing has chosen them, through a per-GPU LRU cache that keeps the most recently used experts
resident. The arithmetic is the model's own, in the same order, so offloaded and
all-on-one-device runs give identical logits. `physical` maps planned devices onto real ones,
which lets the whole mechanism run and be tested on a CPU ("cuda:0" and "cuda:1" both on "cpu").
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext

import torch
from torch import nn

from grokquant.grok.model import Grok2ForCausalLM, SparseMoE
from grokquant.runtime.placement import Placement


def _tensors(module: nn.Module):
    """(owner, kind, name) of every parameter and buffer under module."""
    for owner in module.modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(owner, kind).items():
                if t is not None:
                    yield owner, kind, name


class Offloaded:
    """A module whose weights rest in CPU memory (pinned for CUDA) and visit `device` while used."""

    def __init__(self, module: nn.Module, device: torch.device, stats: dict):
        self.module, self.device, self.stats = module, device, stats
        self.home = []
        for owner, kind, name in _tensors(module):
            t = getattr(owner, kind)[name].to("cpu")
            if device.type == "cuda" and type(t) in (torch.Tensor, nn.Parameter):
                t = t.pin_memory()
            if kind == "_parameters" and type(t) is torch.Tensor:
                t = nn.Parameter(t, requires_grad=False)
            getattr(owner, kind)[name] = t
            self.home.append((owner, kind, name, t))
        self.nbytes = sum(t.numel() * t.element_size() for *_, t in self.home)
        self.event = None
        self.resident = False

    def fetch(self, stream=None) -> None:
        """Copy the weights to the device (asynchronously on `stream` for CUDA)."""
        if self.resident:
            return
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            for owner, kind, name, t in self.home:
                if type(t) in (torch.Tensor, nn.Parameter):
                    moved = t.detach().to(self.device, non_blocking=True, copy=True)
                    if kind == "_parameters":
                        moved = nn.Parameter(moved, requires_grad=False)
                else:  # bitsandbytes parameters move their quantization state in their own .to()
                    moved = t.to(self.device, non_blocking=True)
                getattr(owner, kind)[name] = moved
            if stream is not None:
                self.event = torch.cuda.Event()
                self.event.record(stream)
        self.resident = True
        self.stats["fetches"] += 1
        self.stats["bytes"] += self.nbytes

    def ready(self) -> None:
        """Make the compute stream wait for the copy, and keep the copies alive until it is done with them."""
        if self.event is None:
            return
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(self.event)
        for owner, kind, name, _ in self.home:
            t = getattr(owner, kind)[name]
            if t.device.type == "cuda":
                t.record_stream(compute)
        self.event = None

    def release(self) -> None:
        for owner, kind, name, t in self.home:
            getattr(owner, kind)[name] = t
        self.resident = False
        self.event = None


class ExpertCache:
    """The experts resident on one GPU, least recently used evicted first."""

    def __init__(self, capacity: int, stream, stats: dict):
        self.capacity = max(1, capacity)
        self.stream = stream
        self.stats = stats
        self.entries: OrderedDict[tuple[int, int], Offloaded] = OrderedDict()

    def prefetch(self, keys: list[tuple[int, int]], handles: dict[tuple[int, int], Offloaded]) -> None:
        """Start copying the first experts of `keys` that fit, without evicting any of `keys`."""
        for key in keys[: self.capacity]:
            if key not in self.entries:
                if not self._make_room(protect=set(keys[: self.capacity])):
                    return
                handles[key].fetch(self.stream)
                self.entries[key] = handles[key]

    def get(self, key: tuple[int, int], handle: Offloaded) -> None:
        """Make the expert resident (fetching it if needed) and mark it most recently used."""
        if key in self.entries:
            self.stats["hits"] += 1
            self.entries.move_to_end(key)
        else:
            self.stats["misses"] += 1
            self._make_room(protect={key})
            handle.fetch(self.stream)
            self.entries[key] = handle
        handle.ready()

    def _make_room(self, protect: set) -> bool:
        while len(self.entries) >= self.capacity:
            victim = next((k for k in self.entries if k not in protect), None)
            if victim is None:
                return False
            self.entries.pop(victim).release()
        return True


class OffloadedMoE(SparseMoE):
    """SparseMoE whose experts rest in CPU memory: each routed expert is fetched through the cache."""

    def __init__(self, moe: SparseMoE, layer: int, cache: ExpertCache, device: torch.device, stats: dict):
        nn.Module.__init__(self)
        self.cfg, self.gate, self.experts = moe.cfg, moe.gate, moe.experts
        self.layer, self.cache = layer, cache
        self.handles = {(layer, e): Offloaded(expert, device, stats) for e, expert in enumerate(moe.experts)}

    def forward(self, x: torch.Tensor, sem) -> torch.Tensor:
        # SparseMoE.forward, with each expert made resident before it runs
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = self.route(x, sem)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        used = torch.unique(ids).tolist()  # one host sync per layer: which experts to bring over
        keys = [(self.layer, e) for e in used]
        self.cache.prefetch(keys, self.handles)
        for e in used:
            token, slot = torch.nonzero(ids == e, as_tuple=True)
            self.cache.get((self.layer, e), self.handles[(self.layer, e)])
            y = self.experts[e](x[token], sem.gelu).float()
            out.index_add_(0, token, y * weights[token, slot, None])
        return out.to(x.dtype).view(shape)


def _move_args(device: torch.device):
    def hook(module, args):
        return tuple(a.to(device, non_blocking=True) if isinstance(a, torch.Tensor) else a for a in args)
    return hook


def apply_placement(model: Grok2ForCausalLM, placement: Placement, physical: dict[str, str] | None = None) -> dict:
    """Move the model's modules where `placement` says and install the offload machinery.

    Returns the transfer statistics (fetches, bytes, expert hits and misses), updated as the model runs.
    """
    physical = physical or {}

    def dev(name: str) -> torch.device:
        return torch.device(physical.get(name, name))

    stats = {"fetches": 0, "bytes": 0, "hits": 0, "misses": 0}
    m = model.model
    m.embed_tokens.to(dev(placement.embed))
    m.embed_tokens.register_forward_pre_hook(_move_args(dev(placement.embed)))
    for module in (m.norm, model.lm_head):
        module.to(dev(placement.head))
    m.norm.register_forward_pre_hook(_move_args(dev(placement.head)))

    streams, caches = {}, {}
    for name in placement.gpus:
        d = dev(name)
        streams[name] = torch.cuda.Stream(d) if d.type == "cuda" else None
        caches[name] = ExpertCache(placement.expert_cache.get(name, 2), streams[name], stats)

    dense: dict[int, Offloaded] = {}
    for i, layer in enumerate(m.layers):
        d = dev(placement.layers[i])
        off = placement.offload[i] if placement.layers[i] != "cpu" else frozenset()
        for name, child in layer.named_children():
            if (name == "mlp" and "dense_mlp" in off) or name == "block_sparse_moe":
                continue
            child.to(d)
        moe = layer.block_sparse_moe
        if "experts" in off:
            moe.gate.to(d)
            layer.block_sparse_moe = OffloadedMoE(moe, i, caches[placement.layers[i]], d, stats)
        else:
            moe.to(d)
        if "dense_mlp" in off:
            dense[i] = Offloaded(layer.mlp, d, stats)
        layer.register_forward_pre_hook(_move_args(d))
    if dense:
        _install_prefetch(model, placement, dense, streams)
    return stats


def _install_prefetch(model, placement: Placement, dense: dict[int, Offloaded], streams: dict) -> None:
    """Layer i's dense part is made ready before it runs; the next offloaded one copies meanwhile."""
    order = sorted(dense)
    following = {i: order[(k + 1) % len(order)] for k, i in enumerate(order)}  # wraps to the next token's first

    def prefetch(i: int) -> None:
        dense[i].fetch(streams.get(placement.layers[i]))

    for i in order:
        layer = model.model.layers[i]

        def before(module, args, i=i):
            prefetch(i)  # a no-op when it was prefetched
            dense[i].ready()
            if following[i] != i:
                prefetch(following[i])

        def after(module, args, output, i=i):
            dense[i].release()
            if following[i] == i:  # the only offloaded layer: copy it again for the next token
                prefetch(i)

        layer.register_forward_pre_hook(before)
        layer.register_forward_hook(after)
