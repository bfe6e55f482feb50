"""Where each part of the model lives and computes: GPUs by layer, CPU memory for what does not fit.

Planning (`plan_placement`) works on byte counts alone, so it serves the loader and `grokquant
plan` alike. Decoder layers fill the GPUs in order (a layer never spans two); when the weights do
not fit, the experts of the last layers rest in CPU memory first, then their dense MLPs, and only
then do whole layers (the first ones, as llama.cpp's `-ngl` does) compute on the CPU. The
embedding always stays in CPU memory (a lookup moves one row per token), the final norm and
lm_head go after the last layer's GPU when they fit.

At run time (`apply_placement`) offloaded weights sit in pinned CPU memory and visit the layer's
GPU when used: a layer's dense part is prefetched on a side stream while the layer before it runs;
experts are fetched once routing has chosen them, through a per-GPU LRU cache that keeps the most
recently used experts resident. The arithmetic is the model's own, in the same order, so offloaded
and all-on-one-device runs give identical logits. `physical` maps planned devices onto real ones,
which lets the whole mechanism run and be tested on a CPU ("cuda:0" and "cuda:1" both on "cpu").
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from grokquant.errors import GrokquantError
from grokquant.grok.model import Grok2ForCausalLM, SparseMoE

GiB = 1 << 30
OFFLOADABLE = ("experts", "dense_mlp")  # in the order they leave the GPU


class DoesNotFit(GrokquantError):
    """The model's weights exceed the memory given."""


@dataclass
class LayerBytes:
    attention: int  # attention linears, norms and router: always with the layer
    dense_mlp: int
    experts: list[int]  # one entry per expert

    @property
    def total(self) -> int:
        return self.attention + self.dense_mlp + sum(self.experts)


@dataclass
class ModelBytes:
    """Weight bytes of every placeable part, in the format the runtime holds them."""

    embed: int
    head: int  # final norm + lm_head
    layers: list[LayerBytes]
    kv_bytes_per_token: int  # K and V of one token in one layer
    top_k: int = 2

    @property
    def total(self) -> int:
        return self.embed + self.head + sum(layer.total for layer in self.layers)


@dataclass
class Placement:
    layers: list[str]  # compute device of each decoder layer
    offload: list[frozenset[str]]  # per layer: parts whose weights rest in CPU memory
    embed: str = "cpu"
    head: str = "cpu"
    expert_cache: dict[str, int] = field(default_factory=dict)  # GPU -> experts its LRU cache holds
    context: int = 0  # tokens of KV cache the plan reserved

    @classmethod
    def single(cls, device: str, n_layers: int) -> "Placement":
        device = str(device)
        return cls([device] * n_layers, [frozenset()] * n_layers, embed=device, head=device)

    @property
    def gpus(self) -> list[str]:
        return list(dict.fromkeys(d for d in self.layers + [self.head] if d != "cpu"))

    def device_map(self) -> dict[str, str]:
        """accelerate-style module -> device; "cpu" under a GPU layer means resting in CPU memory."""
        out = {"model.embed_tokens": self.embed}
        for i, (device, off) in enumerate(zip(self.layers, self.offload)):
            out[f"model.layers.{i}"] = device
            if "dense_mlp" in off:
                out[f"model.layers.{i}.mlp"] = "cpu"
            if "experts" in off:
                out[f"model.layers.{i}.block_sparse_moe.experts"] = "cpu"
        out["model.norm"] = out["lm_head"] = self.head
        return out

    @classmethod
    def from_device_map(cls, device_map: dict[str, str], n_layers: int) -> "Placement":
        def get(key: str, default: str = "cpu") -> str:
            return str(device_map.get(key, default))

        layers, offload = [], []
        for i in range(n_layers):
            device = get(f"model.layers.{i}")
            off = {part for part, key in (("experts", "block_sparse_moe.experts"), ("dense_mlp", "mlp"))
                   if device != "cpu" and get(f"model.layers.{i}.{key}", device) == "cpu"}
            layers.append(device)
            offload.append(frozenset(off))
        known = set(cls(layers, offload).device_map()) | {f"model.layers.{i}.{k}" for i in range(n_layers)
                                                          for k in ("mlp", "block_sparse_moe.experts")}
        unknown = [k for k in device_map if k not in known]
        if unknown:
            raise GrokquantError(f"device_map: unknown module(s) {', '.join(unknown[:3])}")
        return cls(layers, offload, embed=get("model.embed_tokens"), head=get("lm_head", get("model.norm")))

    # ---- accounting -----------------------------------------------------------------------------
    def gpu_bytes(self, sizes: ModelBytes) -> dict[str, int]:
        """Resident weights + KV cache per GPU (the LRU cache and staging not included)."""
        out = dict.fromkeys(self.gpus, 0)
        for i, device in enumerate(self.layers):
            if device != "cpu":
                out[device] += _resident(sizes.layers[i], self.offload[i]) + self.context * sizes.kv_bytes_per_token
        if self.head != "cpu":
            out[self.head] += sizes.head
        return out

    def cpu_bytes(self, sizes: ModelBytes) -> int:
        total = sizes.embed + (sizes.head if self.head == "cpu" else 0)
        for i, device in enumerate(self.layers):
            layer = sizes.layers[i]
            if device == "cpu":
                total += layer.total + self.context * sizes.kv_bytes_per_token
            else:
                total += layer.total - _resident(layer, self.offload[i])
        return total

    def offloaded_layers(self, part: str) -> list[int]:
        return [i for i, off in enumerate(self.offload) if part in off]

    def transfer_bytes_per_token(self, sizes: ModelBytes) -> float:
        """Expected bytes streamed to the GPUs per generated token (uniform routing, LRU hit rate = share cached)."""
        total = 0.0
        for device in self.gpus:
            layers = [i for i, d in enumerate(self.layers) if d == device]
            offloaded_experts = [e for i in layers if "experts" in self.offload[i] for e in sizes.layers[i].experts]
            hit = min(1.0, self.expert_cache.get(device, 0) / len(offloaded_experts)) if offloaded_experts else 0.0
            for i in layers:
                layer = sizes.layers[i]
                if "dense_mlp" in self.offload[i]:
                    total += layer.dense_mlp
                if "experts" in self.offload[i]:
                    total += sizes.top_k * (sum(layer.experts) / len(layer.experts)) * (1 - hit)
        return total


def _resident(layer: LayerBytes, offload: frozenset[str]) -> int:
    return (layer.attention + (0 if "dense_mlp" in offload else layer.dense_mlp)
            + (0 if "experts" in offload else sum(layer.experts)))


def _staging(layer: LayerBytes, offload: frozenset[str]) -> int:
    """GPU room the offloaded parts need while used: the dense part twice (one prefetched), two experts."""
    return (2 * layer.dense_mlp if "dense_mlp" in offload else 0) + (2 * max(layer.experts) if "experts" in offload else 0)


def plan_placement(sizes: ModelBytes, max_memory: dict[str, int], context: int = 4096,
                   gpu_reserve: int = 0) -> Placement:
    """The placement with the least offloaded; raises DoesNotFit when even the CPU cannot hold the rest.

    max_memory: device -> bytes ("cuda:0", ..., "cpu"; a missing "cpu" means unlimited); gpu_reserve:
    bytes kept free on every GPU (CUDA context, activations).
    """
    gpus = [d for d in max_memory if d != "cpu"]
    L = len(sizes.layers)
    cpu_cap = max_memory.get("cpu", float("inf"))
    if not gpus:
        placement = Placement.single("cpu", L)
        placement.context = context
        _check_cpu(placement, sizes, cpu_cap)
        return placement
    for n_cpu, n_dense, n_exp in _offload_levels(L):
        offload = [frozenset()] * L
        for i in range(L):
            parts = set()
            if i >= L - n_exp:
                parts.add("experts")
            if i >= L - n_dense:
                parts.add("dense_mlp")
            offload[i] = frozenset(parts)
        placement = _fill(sizes, gpus, max_memory, gpu_reserve, context, n_cpu, offload)
        if placement is not None:
            _check_cpu(placement, sizes, cpu_cap)
            return placement
    raise AssertionError("unreachable: with every layer on the CPU the GPUs hold nothing")


def _offload_levels(L: int):
    """(CPU layers, layers with dense MLP offloaded, layers with experts offloaded), least offload first."""
    for n_exp in range(L + 1):
        yield 0, 0, n_exp
    for n_dense in range(1, L + 1):
        yield 0, n_dense, L
    for n_cpu in range(1, L + 1):
        yield n_cpu, L, L


def _fill(sizes: ModelBytes, gpus: list[str], max_memory: dict[str, int], reserve: int, context: int, n_cpu: int,
          offload: list[frozenset[str]]) -> Placement | None:
    L = len(sizes.layers)
    kv = context * sizes.kv_bytes_per_token
    used = dict.fromkeys(gpus, reserve)
    stage = dict.fromkeys(gpus, 0)
    layers = ["cpu"] * n_cpu
    g = 0
    for i in range(n_cpu, L):
        need = _resident(sizes.layers[i], offload[i]) + kv
        while True:
            dev = gpus[g]
            staging = max(stage[dev], _staging(sizes.layers[i], offload[i]))
            if used[dev] + need + staging <= max_memory[dev]:
                break
            g += 1
            if g == len(gpus):
                return None
        used[dev] += need
        stage[dev] = staging
        layers.append(dev)
    offload = [off if layers[i] != "cpu" else frozenset() for i, off in enumerate(offload)]
    head = "cpu"
    if n_cpu == 0:  # llama.cpp keeps the output on the CPU whenever a layer is there
        for dev in gpus[g:]:
            if used[dev] + stage[dev] + sizes.head <= max_memory[dev]:
                head = dev
                used[dev] += sizes.head
                break
    placement = Placement(layers, offload, embed="cpu", head=head, context=context)
    for dev in gpus:
        experts = [e for i in range(L) if layers[i] == dev and "experts" in offload[i] for e in sizes.layers[i].experts]
        if experts:
            free = max_memory[dev] - used[dev] - stage[dev] + 2 * max(experts)  # the two staging slots are cache too
            placement.expert_cache[dev] = min(len(experts), max(2, free // max(experts)))
    return placement


def _check_cpu(placement: Placement, sizes: ModelBytes, cpu_cap: float) -> None:
    need = placement.cpu_bytes(sizes)
    if need > cpu_cap:
        gpus = ", ".join(f"{d} {b / GiB:.1f} GiB" for d, b in placement.gpu_bytes(sizes).items()) or "no GPU"
        raise DoesNotFit(f"{need / GiB:.1f} GiB must stay in CPU memory (limit {cpu_cap / GiB:.1f} GiB) "
                         f"after filling the GPUs ({gpus}); model {sizes.total / GiB:.1f} GiB")


# ---- run time ------------------------------------------------------------------------------------

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
