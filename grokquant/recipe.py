"""Quantization recipes: a dataclass per recipe, loaded from YAML files under `recipes/`.

A GGUF recipe names a llama.cpp file type (its per-tensor mix) and optional per-class overrides:

    name: q4_k_m-attn-q8
    format: gguf
    ftype: q4_k_m
    overrides: {attention: Q8_0, ffn_down_exps: Q6_K}

Override keys are tensor classes (attention, dense_mlp, experts, output, embedding) or GGUF base
names (attn_v, ffn_down_exps, ...); the more specific key wins. The router and norms are never
quantized.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import GrokquantError
from .quant.ggml_types import TYPES
from .quant.mixes import FTYPES

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
CLASSES = {
    "attention": ("attn_q", "attn_k", "attn_v", "attn_output"),
    "dense_mlp": ("ffn_gate", "ffn_up", "ffn_down"),
    "experts": ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"),
    "output": ("output",),
    "embedding": ("token_embd",),
}
BASE_NAMES = {b for names in CLASSES.values() for b in names}


@dataclass
class GGUFRecipe:
    name: str
    ftype: str
    overrides: dict[str, str] = field(default_factory=dict)
    pure: bool = False  # every quantizable tensor gets the ftype's default type (llama-quantize --pure)
    format: str = "gguf"

    def __post_init__(self):
        if self.ftype not in FTYPES:
            raise GrokquantError(f"recipe {self.name}: unknown ftype {self.ftype!r} (one of {', '.join(FTYPES)})")
        for key, value in self.overrides.items():
            if key not in CLASSES and key not in BASE_NAMES:
                raise GrokquantError(f"recipe {self.name}: unknown tensor class {key!r}")
            if str(value).upper() not in TYPES:
                raise GrokquantError(f"recipe {self.name}: unknown GGML type {value!r} for {key}")
        self.overrides = {k: str(v).upper() for k, v in self.overrides.items()}

    def override_for(self, gguf_name: str) -> str | None:
        """The override type for a GGUF tensor name, or None."""
        base = gguf_name.split(".")[-2] if gguf_name.startswith("blk.") else gguf_name.split(".")[0]
        if base in self.overrides:
            return self.overrides[base]
        for cls, members in CLASSES.items():
            if base in members and cls in self.overrides:
                return self.overrides[cls]
        return None


def load_recipe(spec: str | Path) -> GGUFRecipe:
    """A recipe from a YAML path, or by name from `recipes/` (e.g. "q4_k_m")."""
    path = Path(spec)
    if not path.exists():
        path = RECIPES_DIR / f"{spec}.yaml"
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise GrokquantError(f"recipe {spec}: no such file (and no recipes/{spec}.yaml)") from None
    except yaml.YAMLError as exc:
        raise GrokquantError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise GrokquantError(f"{path}: a recipe is a YAML mapping")
    fmt = raw.get("format", "gguf")
    if fmt != "gguf":
        raise GrokquantError(f"{path}: format {fmt!r} is not a GGUF recipe")
    unknown = set(raw) - {"name", "format", "ftype", "overrides", "pure", "description"}
    if unknown:
        raise GrokquantError(f"{path}: unknown recipe key(s) {', '.join(sorted(unknown))}")
    if "ftype" not in raw:
        raise GrokquantError(f"{path}: missing key ftype")
    return GGUFRecipe(name=raw.get("name", path.stem), ftype=str(raw["ftype"]).lower(),
                      overrides=raw.get("overrides") or {}, pure=bool(raw.get("pure", False)))
