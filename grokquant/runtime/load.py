"""`grokquant.load`: our model with quantized linears, placed over GPUs and CPU memory.

Sources: a GPTQ artifact directory (`grokquant quantize`), a GGUF file, or the original checkpoint
(optionally quantized on the fly by bitsandbytes, nf4 or int8). Each linear becomes the module that
computes it best where it runs (see `qlinear`); the model is built one tensor at a time directly on
the device that will hold it, so loading never needs more memory than the placement itself.
`open_source` is the one place that tells these artifacts apart and finds their tokenizer; `eval`
and `run` open artifacts through it too.

    model = grokquant.load("grok2-gptq", device_map="auto", max_memory={"cuda:0": "24GiB", "cpu": "192GiB"})
    logits = model(tokens)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from grokquant.grok.config import GrokConfig, parse_expert_name
from grokquant.errors import GrokquantError
from grokquant.grok.model import Grok2ForCausalLM
from grokquant.runtime.offload import apply_placement
from grokquant.runtime.placement import GiB, LayerBytes, ModelBytes, Placement, plan_placement
from grokquant.runtime.qlinear import (BNB_KINDS, GGML_INT4_TYPES, KERNELS, bnb_linear, dense_linear, gptq_linear, int4_from_ggml,
                      int4_kernel_available, int4_shape_ok, int8_kernel_available, linear_bytes)
from grokquant.grok.names import tensor_class
from grokquant.runtime.sizes import parse_memory

LINEAR_CLASSES = ("attention", "dense_mlp", "experts", "lm_head")  # tensor classes held by linears
PART_OF_CLASS = {"dense_mlp": "dense_mlp", "experts": "experts"}  # placement parts; the rest stays with the layer


@dataclass
class Source:
    """An opened artifact: its weights, what kind it is, and where its tokenizer comes from."""
    path: Path  # the directory, or the GGUF file (the first of a split set)
    weights: object  # .config and .tensor(release_name)
    kind: str  # gptq, gguf or checkpoint
    semantics: str  # the forward pass it was made for
    tokenizer_path: Path | None  # None for GGUF: the vocabulary is in the file's metadata

    @property
    def config(self) -> GrokConfig:
        return self.weights.config

    def files(self) -> list[Path]:
        """The files holding the weights (every shard of a split GGUF)."""
        if self.kind == "gguf":
            return [f.path for f in self.weights.files]
        return sorted(self.path.glob("*.safetensors"))

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files())

    def tokenizer(self):
        """From the GGUF file's metadata, else from tokenizer.tok.json beside the weights."""
        if self.kind == "gguf":
            from grokquant.gguf.vocab import tokenizer_from_gguf

            return tokenizer_from_gguf(self.weights.metadata)
        if self.tokenizer_path is None:
            raise GrokquantError(f"{self.path}: no tokenizer.tok.json")
        from grokquant.grok.tokenizer import load_tokenizer

        return load_tokenizer(self.tokenizer_path)

    def close(self) -> None:
        self.weights.close()

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


SPLIT_SHARD = re.compile(r"(.+)-(\d{5})-of-(\d{5})\.gguf")  # llama-gguf-split's names


def open_source(path: str | Path) -> Source:
    """The artifact at `path`: a GPTQ directory, a GGUF file (the first shard of a split set) or an
    original checkpoint directory; anything else is refused with a one-line GrokquantError."""
    from grokquant.gptq.weights import GPTQWeights, is_gptq_dir

    path = Path(path)
    if not path.exists():
        raise GrokquantError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix != ".gguf":
            raise GrokquantError(f"{path}: expected a .gguf file or a directory")
        shard = SPLIT_SHARD.fullmatch(path.name)
        if shard and int(shard[2]) != 1:  # only the first shard has the metadata and the shard count
            raise GrokquantError(f"{path}: shard {int(shard[2])} of a split GGUF; "
                                 f"open the first, {shard[1]}-00001-of-{shard[3]}.gguf")
        from grokquant.gguf.weights import GGUFWeights

        w = GGUFWeights(path)
        return Source(path, w, "gguf", w.semantics, None)
    if is_gptq_dir(path):
        w = GPTQWeights(path)
        return Source(path, w, "gptq", "sglang", w.tokenizer_path)
    from grokquant.grok.checkpoint import Checkpoint

    ckpt = Checkpoint.open(path)
    return Source(path, ckpt, "checkpoint", "sglang", ckpt.tokenizer_path)


def is_linear(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and tensor_class(name) in LINEAR_CLASSES


def part_of(name: str) -> str:
    return PART_OF_CLASS.get(tensor_class(name), "attention")


class Builder:
    """Makes the module of each linear for one source, kernel choice and dtype; estimates its bytes."""

    def __init__(self, source: Source, kernel: str, quantize: str | None, dtype: torch.dtype):
        if kernel not in KERNELS:
            raise GrokquantError(f"unknown kernel {kernel!r} (choose from {', '.join(KERNELS)})")
        if quantize is not None and quantize not in BNB_KINDS:
            raise GrokquantError(f"quantize must be one of {', '.join(BNB_KINDS)}, got {quantize!r}")
        if quantize is not None and source.kind != "checkpoint":
            raise GrokquantError(f"quantize={quantize} applies to the original checkpoint, not a {source.kind} file")
        self.source, self.kernel, self.quantize, self.dtype = source, kernel, quantize, dtype
        self.dtype_bytes = torch.empty((), dtype=dtype).element_size()

    def build(self, name: str, device: torch.device) -> nn.Module:
        w = self.source.weights
        if self.source.kind == "gptq":
            packed = w.quantized(name)
            if packed is not None:
                return gptq_linear(packed, device, self.dtype, self.kernel)
        elif self.source.kind == "gguf" and self.kernel == "auto":
            raw, type_name, shape = gguf_raw(w, name)
            module = int4_from_ggml(raw, type_name, shape, device, self.dtype)
            if module is not None:
                return module
        elif self.quantize is not None and tensor_class(name) != "lm_head":
            return bnb_linear(w.tensor(name), self.quantize, device, self.dtype)
        return dense_linear(w.tensor(name), device, self.dtype)

    def kind(self, name: str, shape: tuple[int, int], device_type: str) -> tuple[str, dict]:
        """The module kind `build` will make (and its format settings), from metadata alone."""
        N, K = shape
        w = self.source.weights
        if self.source.kind == "gptq" and w.is_quantized(name):
            spec = w.quantization.for_module(name[: -len(".weight")]) or w.quantization.default
            fmt = dict(bits=spec.bits, group_size=spec.group_size, act_order=spec.act_order)
            if self.kernel == "dense":
                return "dense", {}
            gs = spec.group_size if spec.group_size > 0 else K
            if self.kernel == "auto" and spec.bits == 4 and int4_kernel_available(device_type) \
                    and int4_shape_ok(N, K, gs, device_type):
                return "int4", fmt
            if self.kernel == "auto" and spec.bits == 8 and spec.group_size in (-1, K) \
                    and int8_kernel_available(device_type):
                return "int8", fmt
            return "gptq", fmt
        if self.source.kind == "gguf" and self.kernel == "auto" and w.type_of(name) in GGML_INT4_TYPES \
                and int4_kernel_available(device_type) and int4_shape_ok(N, K, 32, device_type):
            return "int4", dict(group_size=32)
        if self.quantize is not None and tensor_class(name) != "lm_head":
            return ("nf4" if self.quantize == "nf4" else "bnb-int8"), {}
        return "dense", {}

    def nbytes(self, name: str, shape: tuple[int, ...], device_type: str) -> int:
        if not is_linear(name, shape):
            return self.dtype_bytes * math.prod(shape)
        kind, fmt = self.kind(name, shape, device_type)
        return linear_bytes(kind, shape[0], shape[1], self.dtype_bytes, **fmt)


def gguf_raw(w, name: str) -> tuple[torch.Tensor, str, tuple[int, int]]:
    """A release-named matrix of a GGUF file as its stored rows (one expert of a stacked tensor)."""
    from grokquant.grok.names import gguf_name

    gname = gguf_name(name)
    f = w.where[gname]
    info = f.tensors[gname]
    parsed = parse_expert_name(name)
    if parsed:
        rows = info.shape[1]
        return torch.from_numpy(f.raw(gname, parsed[1] * rows, rows)), info.type.name, tuple(info.shape[1:])
    return torch.from_numpy(f.raw(gname)), info.type.name, tuple(info.shape)


def model_bytes(builder: Builder, device_type: str, kv_dtype_bytes: int | None = None) -> ModelBytes:
    """Bytes of every placeable part as `builder` would hold it on `device_type`."""
    cfg = builder.source.config
    g = cfg.global_shapes()
    layers = []
    for layer in range(cfg.num_hidden_layers):
        parts = {"attention": 0, "dense_mlp": 0}
        experts = [0] * cfg.num_local_experts
        for name, shape in cfg.layer_shapes(layer).items():
            b = builder.nbytes(name, shape, device_type)
            parsed = parse_expert_name(name)
            if parsed:
                experts[parsed[1]] += b
            else:
                parts[part_of(name)] += b
        layers.append(LayerBytes(parts["attention"], parts["dense_mlp"], experts))
    kv = 2 * cfg.num_key_value_heads * cfg.head_dim * (kv_dtype_bytes or builder.dtype_bytes)
    return ModelBytes(embed=builder.nbytes("model.embed_tokens.weight", g["model.embed_tokens.weight"], device_type),
                      head=sum(builder.nbytes(n, g[n], device_type) for n in ("lm_head.weight", "model.norm.weight")),
                      layers=layers, kv_bytes_per_token=kv, top_k=cfg.num_experts_per_tok)


def available_memory() -> dict[str, int]:
    """Free memory of every visible GPU and of the host."""
    import psutil

    out = {}
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        out[f"cuda:{i}"] = torch.cuda.mem_get_info(i)[0]
    out["cpu"] = psutil.virtual_memory().available
    return out


def resolve_device(device: str) -> str:
    """--device: cpu, cuda, cuda:N, or auto (the first GPU if any, else the CPU)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GrokquantError(f"--device {device}: no CUDA device is available")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise GrokquantError(f"--device {device}: expected cpu, cuda, cuda:N or auto")
    return device


def resolve_placement(device_map, max_memory, sizes_for, n_layers: int, context: int,
                      gpu_reserve: int) -> Placement:
    """device_map: None (one device: the first GPU if any, else the CPU), "auto", a device, a Placement,
    or an accelerate-style {module: device} dict."""
    if isinstance(device_map, Placement):
        return device_map
    if isinstance(device_map, dict):
        return Placement.from_device_map(device_map, n_layers)
    if device_map is None and max_memory is None:
        return Placement.single("cuda:0" if torch.cuda.is_available() else "cpu", n_layers)
    if device_map in (None, "auto"):
        memory = {k: parse_memory(v) for k, v in (max_memory or available_memory()).items()}
        return plan_placement(sizes_for(memory), memory, context, gpu_reserve)
    device = str(torch.device(device_map))
    return Placement.single("cuda:0" if device == "cuda" else device, n_layers)


def load(path: "str | Path | Source", device_map=None, max_memory: dict | None = None, kernel: str = "auto",
         semantics: str | None = None, quantize: str | None = None, dtype: torch.dtype | None = None,
         context: int = 4096, gpu_reserve: int = GiB, physical: dict[str, str] | None = None) -> Grok2ForCausalLM:
    """Our Grok 2 model on the weights at `path`, with quantized linears, placed by `device_map`.

    kernel: auto (torch int4/int8 kernels where they apply, else dequantize per call), dequant, or
    dense (dequantize once at load). quantize: nf4 / int8 through bitsandbytes (original checkpoint
    only). dtype: activations and unquantized weights (bf16 when a GPU is used, else float32).
    context / gpu_reserve: KV-cache tokens and bytes per GPU the "auto" plan leaves free.
    physical: planned device -> real device (e.g. {"cuda:1": "cpu"}), for testing without GPUs.
    The returned model carries `.placement`, `.transfers` (offload statistics) and `.tokenizer_path`.
    """
    source = path if isinstance(path, Source) else open_source(path)
    cfg = source.config
    physical = dict(physical or {})

    def real(device: str) -> torch.device:
        return torch.device(physical.get(device, device))

    def sizes_for(memory: dict[str, int]) -> ModelBytes:
        gpu = any(real(d).type == "cuda" for d in memory if d != "cpu")
        probe = Builder(source, kernel, quantize, dtype or (torch.bfloat16 if gpu else torch.float32))
        device_type = next((real(d).type for d in memory if d != "cpu"), "cpu")
        return model_bytes(probe, device_type)

    placement = resolve_placement(device_map, max_memory, sizes_for, cfg.num_hidden_layers, context, gpu_reserve)
    if dtype is None:
        uses_cuda = any(real(d).type == "cuda" for d in placement.layers + [placement.head])
        dtype = torch.bfloat16 if uses_cuda else torch.float32
    builder = Builder(source, kernel, quantize, dtype)
    model = Grok2ForCausalLM.empty(cfg, semantics or source.semantics)
    get = source.weights.tensor

    model.assign({"model.embed_tokens.weight": get("model.embed_tokens.weight")}, dtype, real(placement.embed))
    model.assign({"model.norm.weight": get("model.norm.weight")}, dtype, real(placement.head))
    model.lm_head = builder.build("lm_head.weight", real(placement.head))
    for layer in range(cfg.num_hidden_layers):
        compute = real(placement.layers[layer])
        offload = placement.offload[layer] if placement.layers[layer] != "cpu" else frozenset()
        module = model.model.layers[layer]
        prefix = f"model.layers.{layer}."
        for name, shape in cfg.layer_shapes(layer).items():
            local = name[len(prefix):]
            store = torch.device("cpu") if part_of(name) in offload else compute
            if is_linear(name, shape):
                owner, _, attr = local.rpartition(".")  # ".weight" -> the linear module itself
                linear = builder.build(name, compute).to(store)  # packed for where it computes
                module.set_submodule(owner, linear)
            else:
                model.assign({local: get(name)}, dtype, store, module)
    model.transfers = apply_placement(model, placement, physical)
    model.placement = placement
    model.tokenizer_path = source.tokenizer_path
    model.source_kind = source.kind
    model.dtype = dtype
    return model
