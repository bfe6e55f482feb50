"""Release tensor names -> GGUF `grok` tensor names (spec grok2.md §7.2)."""

from __future__ import annotations

from grokquant.grok.config import GrokConfig, parse_expert_name

GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
          "model.norm.weight": "output_norm.weight"}
LAYER = {
    "pre_attn_norm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "post_attn_norm.weight": "attn_output_norm.weight",
    "pre_moe_norm.weight": "ffn_norm.weight", "post_moe_norm.weight": "post_ffw_norm.weight",
    "block_sparse_moe.gate.weight": "ffn_gate_inp.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}
EXPERTS = {"w1": "ffn_gate_exps.weight", "w3": "ffn_up_exps.weight", "w2": "ffn_down_exps.weight"}


def gguf_name(name: str) -> str:
    """GGUF name of a release tensor; all experts of one projection share the stacked name."""
    if name in GLOBAL:
        return GLOBAL[name]
    parsed = parse_expert_name(name)
    if parsed:
        return f"blk.{parsed[0]}.{EXPERTS[parsed[2]]}"
    _, _, layer, rest = name.split(".", 3)
    return f"blk.{layer}.{LAYER[rest]}"


def gguf_tensors(cfg: GrokConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(GGUF name, torch shape) in file order; stacked experts are [n_expert, out, in]."""
    out = [(GLOBAL[n], s) for n, s in cfg.global_shapes().items()]
    for layer in range(cfg.num_hidden_layers):
        seen = set()
        for name, shape in cfg.layer_shapes(layer).items():
            g = gguf_name(name)
            if g in seen:
                continue
            seen.add(g)
            out.append((g, (cfg.num_local_experts, *shape) if parse_expert_name(name) else shape))
    return out
