"""`grokquant plan` without a recipe (or when the asked one does not fit): every recipe's size for the
model, which fit the given GPUs and RAM, and the best one that fits.

"Best" is by measured quality, not by size: the mean KL divergence to the original model on held-out
text, from docs/quality.md ("Every file type and recipe"; tests/test_choose.py checks that this table and
that document agree). Those numbers come from a 4.2M-parameter trained Grok 2, so they order the recipes;
they do not predict the real model's KLD. Recipes never measured are listed but not recommended.
"""

from __future__ import annotations

from dataclasses import dataclass

from grokquant.errors import GrokquantError
from grokquant.quant.ggml.mixes import FTYPES
from grokquant.quantize.recipe import RECIPES_DIR, GGUFRecipe, load_recipe
from grokquant.runtime.placement import GiB
from grokquant.runtime.plan import PlanReport, make_plan

# mean KLD against the original (docs/quality.md, "Every file type and recipe"), llama.cpp engine for GGUF
# files, our loader for GPTQ directories
MEASURED_KLD: dict[str, float] = {
    "bf16": 0.00011, "int8": 0.00018, "q8_0": 0.00061, "gptq-w4g128-experts-w8-attn": 0.00128, "q6_k": 0.00213,
    "q5_0": 0.00453, "q5_k_m": 0.00462, "q5_k_s": 0.00466, "q5_1": 0.00477, "gptq-w4g128": 0.00805,
    "q4_k_m-attn-q8": 0.00871, "q4_k_m-gptq": 0.00914, "iq4_xs-gptq": 0.00964, "q4_k_m-imatrix": 0.00978,
    "q4_k_m": 0.01016, "q4_k_s": 0.01035, "iq4_nl": 0.01126, "iq4_xs": 0.01131, "q4_1": 0.01222,
    "rtn-w4g128": 0.01331, "q4_0": 0.01478, "q3_k_m": 0.02859, "q3_k_s": 0.03097, "q3_k_l": 0.03163,
    "iq3_m": 0.0334, "iq3_xs": 0.0335, "iq3_s": 0.03438, "iq3_xxs": 0.04024, "iq3_xxs-gptq": 0.04033,
    "iq2_m-gptq": 0.05002, "iq2_m": 0.05034, "iq2_s": 0.06092, "q2_k-gptq": 0.08153, "q2_k": 0.09181,
    "iq2_xs": 0.10196, "q2_k_s": 0.10661, "iq2_xxs": 0.11655, "iq2_xxs-gptq": 0.11776, "iq1_m-gptq": 0.15723,
    "iq1_m": 0.15724, "iq1_s": 0.17604,
}

SKIPPED_FTYPES = {"f32", "f16"}  # bf16 is the original's own precision; f32/f16 only cost more


@dataclass
class Choice:
    name: str
    report: PlanReport
    kld: float | None

    @property
    def fits(self) -> bool:
        return self.report.problem is None

    @property
    def command(self) -> str:
        """How to make the artifact."""
        rec = self.report.recipe
        if isinstance(rec, GGUFRecipe) and not rec.calibrated:
            spec = f"--type {self.name}" if self.name in FTYPES else f"--recipe {self.name}"
            return f"grokquant convert CKPT -o {self.name}.gguf {spec}" + \
                (" --imatrix IMATRIX" if self.report.needs_imatrix else "")
        out = f"{self.name}.gguf" if isinstance(rec, GGUFRecipe) else self.name
        return f"grokquant quantize CKPT -o {out} --recipe {self.name}"


def candidates() -> list[str]:
    """llama.cpp's file types, then the recipes under recipes/ that are not one of them by another name."""
    names = [f for f in FTYPES if f not in SKIPPED_FTYPES]
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        rec = load_recipe(path)
        if rec.name in names:
            continue
        if isinstance(rec, GGUFRecipe) and rec == GGUFRecipe(rec.name, rec.ftype) and rec.ftype in names:
            continue
        if isinstance(rec, GGUFRecipe) and rec.target_bpw is not None:
            continue  # its size is whatever --target-bpw asks
        names.append(rec.name)
    return names


def choose(cfg, gpu: int, gpus: int, ram: int, context: int = 4096, gpu_reserve: int = GiB,
           tok=None) -> list[Choice]:
    """Every candidate's plan, best measured quality first (unmeasured ones last, largest first)."""
    from grokquant.runtime.plan import recipe_from

    out = [Choice(name, make_plan(cfg, recipe_from(name), gpu, gpus, ram, context, gpu_reserve, tok),
                  MEASURED_KLD.get(name)) for name in candidates()]
    return sorted(out, key=lambda c: (c.kld is None, c.kld if c.kld is not None else -c.report.file_bytes))


def best(choices: list[Choice]) -> Choice:
    for c in choices:
        if c.fits and c.kld is not None:
            return c
    raise GrokquantError("no measured recipe fits: give more --gpu/--ram, or fewer --context tokens")


def render_choices(choices: list[Choice], pick: Choice | None) -> str:
    lines = ["", f"{'recipe':<30}{'format':<7}{'GB':>8}{'bpw':>7}{'mean KLD':>11}  fits  make it with"]
    for c in choices:
        r = c.report
        kind = "GGUF" if isinstance(r.recipe, GGUFRecipe) else "GPTQ"
        kld = f"{c.kld:.5f}" if c.kld is not None else "-"
        mark = "yes" if c.fits else "no"
        star = " <- best that fits" if c is pick else ""
        lines.append(f"{c.name:<30}{kind:<7}{r.file_bytes / 1e9:>8.2f}{r.bits_per_weight:>7.2f}{kld:>11}  "
                     f"{mark:<5} {c.command}{star}")
    lines.append("(mean KLD: docs/quality.md, measured on a small trained Grok 2; it orders the recipes, it does "
                 "not predict the real model's)")
    return "\n".join(lines)
