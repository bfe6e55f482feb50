"""Where each part of the model lives and computes: GPUs by layer, CPU memory for what does not fit.

Planning (`plan_placement`) works on byte counts alone, so it serves the loader and `grokquant
plan` alike. Decoder layers fill the GPUs in order (a layer never spans two); when the weights do
not fit, the experts of the last layers rest in CPU memory first, then their dense MLPs, and only
then do whole layers (the first ones, as llama.cpp's `-ngl` does) compute on the CPU. The
embedding always stays in CPU memory (a lookup moves one row per token), the final norm and
lm_head go after the last layer's GPU when they fit. `offload.apply_placement` carries a plan out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from grokquant.errors import GrokquantError

GiB = 1 << 30


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
    if context < 0:
        raise GrokquantError(f"context {context}: tokens of KV cache cannot be negative")
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
