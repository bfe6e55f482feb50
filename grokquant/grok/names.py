"""Every tensor of Grok 2 in one table: its release name, its GGUF `grok` name, its class, and the
calibration statistics group of its input. GGUF names as llama.cpp's `convert_hf_to_gguf.py`
(GrokModel) and `llama-arch.cpp` (LLM_ARCH_GROK) spell them.

Statistics groups name the inputs that calibration measures: q/k/v share one input (`attn_qkv`), the
dense gate/up share one (`mlp_gate_up`), o and down have their own; per expert `expertE_w13` (the
tokens routed to it, shared by w1/w3) and `expertE_w2` (its own intermediate activations).
"""

from __future__ import annotations

from dataclasses import dataclass

from grokquant.grok.config import GrokConfig, expert_name, parse_expert_name

CLASSES = ("attention", "dense_mlp", "experts", "router", "norms", "embedding", "lm_head")


@dataclass(frozen=True)
class TensorName:
    release: str  # global: the full name; layer: relative to "model.layers.L."; expert: the projection
    gguf: str  # relative to "blk.L." for layer and expert tensors
    cls: str  # one of CLASSES
    group: str | None = None  # statistics group of the input (experts: "w13" / "w2", per expert)

    @property
    def base(self) -> str:
        """The GGUF name without ".weight": what recipes and llama.cpp's rules match on."""
        return self.gguf.rsplit(".", 1)[0]


GLOBALS = (
    TensorName("model.embed_tokens.weight", "token_embd.weight", "embedding"),
    TensorName("lm_head.weight", "output.weight", "lm_head"),
    TensorName("model.norm.weight", "output_norm.weight", "norms"),
)
LAYER = (
    TensorName("pre_attn_norm.weight", "attn_norm.weight", "norms"),
    TensorName("self_attn.q_proj.weight", "attn_q.weight", "attention", "attn_qkv"),
    TensorName("self_attn.k_proj.weight", "attn_k.weight", "attention", "attn_qkv"),
    TensorName("self_attn.v_proj.weight", "attn_v.weight", "attention", "attn_qkv"),
    TensorName("self_attn.o_proj.weight", "attn_output.weight", "attention", "attn_o"),
    TensorName("post_attn_norm.weight", "attn_output_norm.weight", "norms"),
    TensorName("pre_moe_norm.weight", "ffn_norm.weight", "norms"),
    TensorName("post_moe_norm.weight", "post_ffw_norm.weight", "norms"),
    TensorName("block_sparse_moe.gate.weight", "ffn_gate_inp.weight", "router"),
    TensorName("mlp.gate_proj.weight", "ffn_gate.weight", "dense_mlp", "mlp_gate_up"),
    TensorName("mlp.up_proj.weight", "ffn_up.weight", "dense_mlp", "mlp_gate_up"),
    TensorName("mlp.down_proj.weight", "ffn_down.weight", "dense_mlp", "mlp_down"),
)
EXPERTS = (  # gate (gets GELU), up, down; each stacked over the experts in one GGUF tensor
    TensorName("w1", "ffn_gate_exps.weight", "experts", "w13"),
    TensorName("w3", "ffn_up_exps.weight", "experts", "w13"),
    TensorName("w2", "ffn_down_exps.weight", "experts", "w2"),
)
DENSE_LINEARS = tuple(t for t in LAYER if t.group is not None)  # the layer's quantized linears, in order
_BY_RELEASE = {t.release: t for t in GLOBALS + LAYER}
_BY_GGUF = {t.gguf: t for t in GLOBALS + LAYER + EXPERTS}
_EXPERT = {t.release: t for t in EXPERTS}


def lookup(name: str) -> TensorName:
    """The table entry of a release name ("model.layers.3.mlp.up_proj.weight") or a GGUF name
    ("blk.3.ffn_up.weight")."""
    parsed = parse_expert_name(name)
    if parsed:
        return _EXPERT[parsed[2]]
    if name in _BY_RELEASE or name in _BY_GGUF:
        return _BY_RELEASE.get(name) or _BY_GGUF[name]
    parts = name.split(".")
    if name.startswith("model.layers.") and len(parts) > 3 and parts[2].isdigit():
        return _BY_RELEASE[".".join(parts[3:])]
    if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit():
        return _BY_GGUF[".".join(parts[2:])]
    raise KeyError(name)


def tensor_class(name: str) -> str:
    """attention, dense_mlp, experts, router, norms, embedding or lm_head, of a release or GGUF name."""
    return lookup(name).cls


def gguf_name(name: str) -> str:
    """GGUF name of a release tensor; all experts of one projection share the stacked name."""
    entry = lookup(name)
    if entry in GLOBALS:
        return entry.gguf
    return f"blk.{name.split('.')[2]}.{entry.gguf}"


def release_names(gguf: str, cfg: GrokConfig) -> list[str]:
    """The release tensors a GGUF tensor holds: one, or every expert of a stacked projection."""
    entry = lookup(gguf)
    if entry in GLOBALS:
        return [entry.release]
    layer = int(gguf.split(".")[1])
    if entry in EXPERTS:
        return [expert_name(layer, e, entry.release) for e in range(cfg.num_local_experts)]
    return [f"model.layers.{layer}.{entry.release}"]


def gguf_tensors(cfg: GrokConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(GGUF name, torch shape) in file order; stacked experts are [n_expert, out, in]."""
    out = [(gguf_name(n), s) for n, s in cfg.global_shapes().items()]
    for layer in range(cfg.num_hidden_layers):
        seen = set()
        for name, shape in cfg.layer_shapes(layer).items():
            g = gguf_name(name)
            if g in seen:
                continue
            seen.add(g)
            out.append((g, (cfg.num_local_experts, *shape) if parse_expert_name(name) else shape))
    return out


def gguf_bases(cls: str) -> tuple[str, ...]:
    """The GGUF base names of a tensor class ("attention" -> attn_q, attn_k, attn_v, attn_output)."""
    return tuple(t.base for t in GLOBALS + LAYER + EXPERTS if t.cls == cls)


# ---- statistics groups --------------------------------------------------------------------------------

def expert_group(expert: int, kind: str) -> str:
    """The statistics group of expert `expert`'s w1/w3 input (kind "w13") or w2 input ("w2")."""
    return f"expert{expert}_{kind}"


def expert_groups(expert: int) -> tuple[str, ...]:
    """Every statistics group of one expert, the all-token stand-ins of an under-covered one included."""
    own = (expert_group(expert, "w13"), expert_group(expert, "w2"))
    return own + tuple(all_tokens(g) for g in own)


def all_tokens(group: str) -> str:
    """The group's statistics as if every calibration token had been routed to the expert."""
    return group + "_all"


def input_group(linear: str) -> str | None:
    """Statistics group of a linear's input, from its module name within a decoder layer
    ("self_attn.k_proj" -> attn_qkv, "block_sparse_moe.experts.3.w2" -> expert3_w2); None for the router."""
    parts = linear.split(".")
    if len(parts) == 4 and parts[:2] == ["block_sparse_moe", "experts"] and parts[3] in _EXPERT:
        return expert_group(int(parts[2]), _EXPERT[parts[3]].group)
    entry = _BY_RELEASE.get(linear + ".weight")
    return entry.group if entry else None


def stack_groups(linear: str | None, proj: str | None, experts: range) -> list[str]:
    """The statistics groups of one quantization stack: a dense linear, or a projection of some experts."""
    if linear is not None:
        return [_BY_RELEASE[linear + ".weight"].group]
    return [expert_group(e, _EXPERT[proj].group) for e in experts]
