"""`grokquant inspect`: what a checkpoint holds, what it costs in each format, what is wrong."""

from __future__ import annotations

from grokquant.grok.checkpoint import Checkpoint
from grokquant.runtime.sizes import format_bytes, param_counts

CONFIG_SUMMARY = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "intermediate_size", "moe_intermediate_size", "num_local_experts", "num_experts_per_tok",
                  "vocab_size", "max_position_embeddings", "rope_theta", "rope_type")


def describe(ckpt: Checkpoint) -> dict:
    """A JSON-able report. Counts come from the tensors found on disk, not from config.json."""
    shapes = {name: ckpt.shape(name) for name in ckpt.entries if _complete(ckpt, name)}
    report = {
        "path": str(ckpt.path),
        "layout": ckpt.layout,
        "files": len(ckpt.files),
        "tensors": len(ckpt.entries),
        "tensor_slices": sum(len(s) for s in ckpt.entries.values()),
        "bytes_on_disk": sum(f.stat().st_size for f in ckpt.files),
        "tokenizer": str(ckpt.tokenizer_path) if ckpt.tokenizer_path else None,
        "problems": list(ckpt.problems),
    }
    if ckpt.config is not None:
        cfg = ckpt.config
        report["config"] = {k: getattr(cfg, k) for k in CONFIG_SUMMARY}
        report["parameters"] = param_counts(shapes, cfg)
        report["parameters_expected"] = param_counts(cfg.all_shapes(), cfg)["total"]
        report["bytes_by_format"] = format_bytes(cfg)
    return report


def _complete(ckpt: Checkpoint, name: str) -> bool:
    from grokquant.grok.config import TP_RANKS, parse_expert_name

    slices = ckpt.entries[name]
    if None in slices:
        return True
    return parse_expert_name(name) is not None and set(slices) == set(range(TP_RANKS))


def _human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{n:.0f}"
        n /= 1000
    return f"{n:.1f}P"


def render(report: dict) -> str:
    lines = [f"checkpoint  {report['path']}",
             f"layout      {report['layout']} ({report['files']} files, {report['tensors']} tensors, "
             f"{report['tensor_slices']} stored slices, {_human(report['bytes_on_disk'])}B on disk)",
             f"tokenizer   {report['tokenizer'] or 'MISSING'}"]
    if "config" in report:
        cfg = report["config"]
        lines.append("config      " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
        p = report["parameters"]
        lines.append("parameters")
        for key in ("total", "experts", "dense_mlp", "attention", "embedding", "lm_head", "router", "norms",
                    "always_on", "active_per_token"):
            lines.append(f"  {key:<18}{p[key]:>20,}  ({_human(p[key])})")
        if p["total"] != report["parameters_expected"]:
            lines.append(f"  config.json implies {report['parameters_expected']:,}")
        lines.append("size by format (weights)")
        total = p["total"] or 1
        for fmt, nbytes in report["bytes_by_format"].items():
            lines.append(f"  {fmt:<18}{nbytes:>20,} B  {nbytes / 1e9:10.3f} GB  {8 * nbytes / total:6.3f} bpw")
    if report["problems"]:
        lines.append(f"problems ({len(report['problems'])})")
        lines += [f"  - {p}" for p in report["problems"]]
    else:
        lines.append("problems    none")
    return "\n".join(lines)
