"""`grokquant plan`: what a recipe weighs and where it fits, before anything is converted or loaded.

For a config (the real Grok 2 by default) and a recipe: bytes per tensor class, the KV cache for a
context length, and the placement over `--gpus` GPUs of `--gpu` bytes and `--ram` of CPU memory, as
`placement.plan_placement` decides it for the loader: which layers go to which GPU, what rests in
CPU memory, how many experts the GPU cache holds, the expected bytes streamed per generated token,
and the llama.cpp flags (`-ngl`, `-ot ...=CPU`, `-ts`) that put the same tensors in the same places.

GGUF recipes are placed with their file bytes (llama.cpp holds tensors as stored); GPTQ recipes with
the bytes our loader holds (int4 kernel layout with bf16 scales and zeros on CUDA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from grokquant.grok.config import GrokConfig, parse_expert_name
from grokquant.errors import GrokquantError
from grokquant.runtime.placement import GiB, DoesNotFit, LayerBytes, ModelBytes, Placement, plan_placement
from grokquant.quantize.recipe import GGUFRecipe, GPTQRecipe, load_recipe
from grokquant.grok.names import CLASSES, tensor_class
from grokquant.runtime.sizes import gptq_bytes

def recipe_from(spec: str) -> GGUFRecipe | GPTQRecipe:
    """A recipe by name or path; a bare llama.cpp file type (bf16, q8_0, ...) is a GGUF recipe too."""
    from grokquant.quant.ggml.mixes import FTYPES

    if spec.lower() in FTYPES:
        return GGUFRecipe(spec.lower(), spec.lower())
    return load_recipe(spec)


@dataclass
class ClassSize:
    params: int = 0
    nbytes: int = 0

    @property
    def bpw(self) -> float:
        return 8 * self.nbytes / self.params if self.params else 0.0


def class_sizes(cfg: GrokConfig, recipe, has_imatrix: bool = False) -> dict[str, ClassSize]:
    """Artifact bytes per tensor class: the GGUF file, or the GPTQ safetensors."""
    out = {c: ClassSize() for c in CLASSES}
    if isinstance(recipe, GGUFRecipe):
        from grokquant.gguf.convert import plan as gguf_plan

        for t in gguf_plan(cfg, recipe, has_imatrix):
            s = out[tensor_class(t.name)]
            s.params += math.prod(t.shape)
            s.nbytes += t.nbytes
        return out
    for name, shape in cfg.all_shapes().items():
        cls = tensor_class(name)
        qc = recipe.config_for(cls) if cls in ("attention", "dense_mlp", "experts") else None
        s = out[cls]
        s.params += math.prod(shape)
        s.nbytes += gptq_bytes(shape, qc.bits, qc.group_size if qc.group_size > 0 else shape[1]) \
            if qc is not None else 2 * math.prod(shape)
    return out


def runtime_bytes(cfg: GrokConfig, recipe, kv_bytes: int = 2, has_imatrix: bool = False) -> ModelBytes:
    """Bytes per placeable part as the runtime holds them (llama.cpp for GGUF, our loader for GPTQ)."""
    from grokquant.runtime.qlinear import linear_bytes

    per_name: dict[str, int] = {}
    if isinstance(recipe, GGUFRecipe):
        from grokquant.gguf.convert import plan as gguf_plan

        for t in gguf_plan(cfg, recipe, has_imatrix):
            for src in t.sources:
                per_name[src] = t.nbytes // len(t.sources)
    else:
        for name, shape in cfg.all_shapes().items():
            cls = tensor_class(name)
            qc = recipe.config_for(cls) if cls in ("attention", "dense_mlp", "experts") else None
            if qc is None:
                per_name[name] = 2 * math.prod(shape)
            elif qc.bits == 4:
                per_name[name] = linear_bytes("int4", *shape, 2, group_size=qc.group_size, act_order=qc.act_order)
            elif qc.bits == 8 and qc.group_size == -1:
                per_name[name] = linear_bytes("int8", *shape, 2)
            else:
                per_name[name] = linear_bytes("gptq", *shape, 2, bits=qc.bits, group_size=qc.group_size)
    layers = []
    for layer in range(cfg.num_hidden_layers):
        attention = dense = 0
        experts = [0] * cfg.num_local_experts
        for name in cfg.layer_shapes(layer):
            parsed = parse_expert_name(name)
            if parsed:
                experts[parsed[1]] += per_name[name]
            elif tensor_class(name) == "dense_mlp":
                dense += per_name[name]
            else:
                attention += per_name[name]
        layers.append(LayerBytes(attention, dense, experts))
    return ModelBytes(embed=per_name["model.embed_tokens.weight"],
                      head=per_name["lm_head.weight"] + per_name["model.norm.weight"], layers=layers,
                      kv_bytes_per_token=2 * cfg.num_key_value_heads * cfg.head_dim * kv_bytes,
                      top_k=cfg.num_experts_per_tok)


def layer_regex(layers: list[int]) -> str:
    """A regex alternation matching exactly these layer numbers, by decades: (3[1-9]|[4-5][0-9]|6[0-3])."""
    decades: dict[int, list[int]] = {}
    for i in layers:
        decades.setdefault(i // 10, []).append(i % 10)
    parts, full = [], []
    for tens, digits in sorted(decades.items()):
        contiguous = digits == list(range(digits[0], digits[-1] + 1))
        if tens and contiguous and len(digits) == 10:
            full.append(tens)
            continue
        prefix = str(tens) if tens else ""
        if contiguous and len(digits) > 1:
            parts.append(f"{prefix}[{digits[0]}-{digits[-1]}]")
        else:
            parts.extend(f"{prefix}{d}" for d in digits)
    if full:  # whole decades: [4-5][0-9]
        runs, start = [], full[0]
        for a, b in zip(full, full[1:] + [None]):
            if b != a + 1:
                runs.append(f"{start}[0-9]" if start == a else f"[{start}-{a}][0-9]")
                start = b
        parts = runs + parts
    return "(" + "|".join(parts) + ")"


def llama_cpp_flags(placement: Placement, n_layers: int, context: int) -> list[str]:
    """llama.cpp options giving the same placement (layers on GPUs, tensors kept in CPU memory)."""
    gpu_layers = [i for i, d in enumerate(placement.layers) if d != "cpu"]
    ngl = len(gpu_layers) + (1 if placement.head != "cpu" and len(gpu_layers) == n_layers else 0)
    flags = [f"-c {context}", f"-ngl {ngl}"]
    gpus = [d for d in placement.gpus]
    if len(gpus) > 1:
        counts = [sum(1 for d in placement.layers if d == g) for g in gpus]
        flags.append("-sm layer -ts " + ",".join(str(c) for c in counts))
    for part, names in (("experts", "ffn_(gate|up|down)_exps"), ("dense_mlp", "ffn_(gate|up|down)")):
        layers = placement.offloaded_layers(part)
        if layers:
            which = r"\d+" if len(layers) == len(gpu_layers) == n_layers else layer_regex(layers)
            flags.append(f'-ot "blk\\.{which}\\.{names}\\.weight=CPU"')
    return flags


@dataclass
class PlanReport:
    cfg: GrokConfig
    recipe: object
    classes: dict[str, ClassSize]
    sizes: ModelBytes
    context: int
    memory: dict[str, int]
    gpu_reserve: int
    placement: Placement | None = None
    problem: str | None = None
    flags: list[str] = field(default_factory=list)
    file_bytes: int = 0  # the artifact on disk: for GGUF the header and alignment too
    needs_imatrix: bool = False  # GGUF types llama.cpp refuses to make without importance data

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.classes.values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.total_bytes / sum(s.params for s in self.classes.values())

    @property
    def kv_bytes(self) -> int:
        return self.context * self.sizes.kv_bytes_per_token * self.cfg.num_hidden_layers


def make_plan(cfg: GrokConfig, recipe, gpu_bytes: int, n_gpus: int, ram_bytes: int, context: int = 4096,
              gpu_reserve: int = GiB, tok=None) -> PlanReport:
    """`tok`: the checkpoint's tokenizer, for the exact GGUF header size (else estimated)."""
    memory = {f"cuda:{i}": gpu_bytes for i in range(n_gpus)}
    memory["cpu"] = ram_bytes
    needs = has_imatrix = False
    if isinstance(recipe, GGUFRecipe):
        from grokquant.gguf.convert import file_bytes, needs_imatrix

        # a type that needs importance data is made with it, and the mixes' imatrix rules then apply
        needs = needs_imatrix(cfg, recipe)
        has_imatrix = recipe.calibrated or needs
    sizes = runtime_bytes(cfg, recipe, has_imatrix=has_imatrix)
    report = PlanReport(cfg, recipe, class_sizes(cfg, recipe, has_imatrix), sizes, context, memory, gpu_reserve,
                        needs_imatrix=needs)
    report.file_bytes = file_bytes(cfg, recipe, tok, has_imatrix) if isinstance(recipe, GGUFRecipe) \
        else report.total_bytes
    try:
        report.placement = plan_placement(sizes, memory, context, gpu_reserve)
        report.flags = llama_cpp_flags(report.placement, cfg.num_hidden_layers, context)
    except DoesNotFit as exc:
        report.problem = str(exc)
    return report


def _ranges(layers: list[int]) -> str:
    out, start = [], None
    for k, i in enumerate(layers):
        if start is None:
            start = i
        if k + 1 == len(layers) or layers[k + 1] != i + 1:
            out.append(f"{start}" if start == i else f"{start}-{i}")
            start = None
    return ",".join(out) or "none"


def render(report: PlanReport) -> str:
    cfg, rec = report.cfg, report.recipe
    kind = "GGUF" if isinstance(rec, GGUFRecipe) else "GPTQ"
    lines = [f"Grok 2 ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_local_experts} experts "
             f"top-{cfg.num_experts_per_tok}), recipe {rec.name} ({kind})", "",
             f"{'class':<12}{'params':>17}{'GB':>10}{'GiB':>10}{'bpw':>7}"]
    params = 0
    for cls, s in report.classes.items():
        if s.params:
            params += s.params
            lines.append(f"{cls:<12}{s.params:>17,}{s.nbytes / 1e9:>10.2f}{s.nbytes / GiB:>10.2f}{s.bpw:>7.2f}")
    total = report.total_bytes
    lines.append(f"{'total':<12}{params:>17,}{total / 1e9:>10.1f}{total / GiB:>10.1f}{8 * total / params:>7.2f}")
    runtime = report.sizes.total
    if kind == "GPTQ":
        lines.append(f"held by the loader (int4 kernel layout, bf16 scales and zeros): {runtime / GiB:.1f} GiB")
    per_token = report.sizes.kv_bytes_per_token * cfg.num_hidden_layers
    lines += ["", f"KV cache (bf16/f16): {per_token // 1024} KiB per token; {report.context} tokens: "
                  f"{report.kv_bytes / GiB:.2f} GiB", ""]
    gpus = [d for d in report.memory if d != "cpu"]
    lines.append(f"memory: {len(gpus)} x {report.memory[gpus[0]] / GiB:.0f} GiB GPU" if gpus else "memory: no GPU")
    lines[-1] += f", {report.memory['cpu'] / GiB:.0f} GiB RAM, {report.gpu_reserve / GiB:.1f} GiB kept free per GPU"
    if report.problem:
        lines.append(f"DOES NOT FIT: {report.problem}")
        return "\n".join(lines)
    p, sizes = report.placement, report.sizes
    used = p.gpu_bytes(sizes)
    for dev in p.gpus:
        layers = [i for i, d in enumerate(p.layers) if d == dev]
        what = f"layers {_ranges(layers)}" + (" + output" if p.head == dev else "")
        cache = p.expert_cache.get(dev)
        extra = f", LRU cache of {cache} experts" if cache else ""
        lines.append(f"  {dev}: {what}: {used[dev] / GiB:.1f} GiB weights + KV{extra}")
    cpu = ["embedding"]
    for part, label in (("experts", "experts"), ("dense_mlp", "dense MLP")):
        layers = p.offloaded_layers(part)
        if layers:
            cpu.append(f"{label} of layers {_ranges(layers)}")
    cpu_layers = [i for i, d in enumerate(p.layers) if d == "cpu"]
    if cpu_layers:
        cpu.append(f"layers {_ranges(cpu_layers)} computed on the CPU")
    if p.head == "cpu":
        cpu.append("output")
    lines.append(f"  cpu: {', '.join(cpu)}: {p.cpu_bytes(sizes) / GiB:.1f} GiB")
    moved = p.transfer_bytes_per_token(sizes)
    lines.append(f"  per generated token over PCIe (offloaded weights streamed to the GPU): ~{moved / 1e9:.2f} GB"
                 + (f" (~{25e9 / moved:.1f} tokens/s at 25 GB/s)" if moved else ""))
    lines += ["", "llama.cpp: " + " ".join(report.flags)]
    if any(p.offloaded_layers(part) for part in ("experts", "dense_mlp")):
        lines.append("  (llama.cpp computes CPU-resident tensors on the CPU for single tokens, so only activations "
                     "cross PCIe when generating; prompt batches copy them to the GPU)")
    return "\n".join(lines)


def plan(recipe: str, gpu: int, gpus: int, ram: int, context: int = 4096, gpu_reserve: int = GiB,
         cfg: GrokConfig | None = None, tok=None) -> PlanReport:
    """The report for a recipe name/path on the real Grok 2 (or `cfg`)."""
    if gpus < 0:
        raise GrokquantError("--gpus must be 0 or more")
    return make_plan(cfg or GrokConfig(), recipe_from(recipe), gpu, gpus, ram, context, gpu_reserve, tok)
