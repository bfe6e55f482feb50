"""The results of `grokquant eval` for people and programs: a table, JSON, and a figure."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from grokquant.errors import GrokquantError
from grokquant.io.paths import replacing


def render(results: list[dict], baseline_label: str | None = None) -> str:
    """One row per artifact; the KLD columns when there was a baseline."""
    has_base = any("kld" in r for r in results)
    head = f"{'artifact':<32}{'MB':>8}{'bpw':>7}{'PPL':>18}"
    if has_base:
        head += f"{'mean KLD':>11}{'KLD 99%':>10}{'KLD 99.9%':>11}{'top-1 %':>9}{'Δp %':>8}"
    lines = [head]
    for r in results:
        line = (f"{r['artifact'][:31]:<32}{r['size_bytes'] / 1e6:>8.2f}{r['bits_per_weight']:>7.2f}"
                f"{r['ppl']:>10.3f} ± {r['ppl_se']:<5.3f}")
        if "kld" in r:
            line += (f"{r['kld']:>11.5f}{r['kld_p99']:>10.4f}{r['kld_p999']:>11.4f}{100 * r['top1']:>9.2f}"
                     f"{100 * r['dp']:>8.3f}")
        lines.append(line)
    n = results[0]["tokens"] if results else 0
    lines.append(f"{n} scored tokens" + (f"; KLD, top-1 and Δp against {baseline_label}" if has_base else ""))
    base_ppl = {r["semantics"]: r["ppl_base"] for r in results if "ppl_base" in r}
    if base_ppl:  # each artifact is compared with the baseline computed in its own semantics
        lines.append(f"{baseline_label} PPL: " + ", ".join(f"{v:.3f} ({k} semantics)" for k, v in base_ppl.items()))
    return "\n".join(lines)


def to_json(results: list[dict]) -> list[dict]:
    """The results without the per-token KL divergences (kept for the plot)."""
    return [{k: v for k, v in r.items() if k != "kld_values"} for r in results]


def require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise GrokquantError("--plot needs matplotlib (pip install 'grokquant[plot]')")


def plot(results: list[dict], path: str | Path) -> Path:
    """Perplexity against size, and the distribution of per-token KL divergence."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        ax1.errorbar(r["size_bytes"] / 1e6, r["ppl"], yerr=r["ppl_se"], fmt="o")
        ax1.annotate(r["artifact"], (r["size_bytes"] / 1e6, r["ppl"]), fontsize=7, xytext=(4, 4),
                     textcoords="offset points")
        values = r.get("kld_values")
        if values is not None and values.numel() and values.max() > 0:
            v = values.clamp(min=1e-8).sort().values.numpy()
            ax2.plot(v, 1 - np.arange(len(v)) / len(v), label=r["artifact"])
    ax1.set(xlabel="size (MB)", ylabel="perplexity", title="perplexity vs size")
    ax1.margins(x=0.25)
    ax2.set(xscale="log", yscale="log", xlabel="per-token KL divergence", ylabel="fraction of tokens ≥ x",
            title="KL divergence from the baseline")
    if ax2.lines:
        ax2.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=120, format=path.suffix[1:] or "png")  # the temporary's name has no suffix
    finally:
        plt.close(fig)
    return path
