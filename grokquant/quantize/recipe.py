"""Quantization recipes: a dataclass per recipe, loaded from YAML files under `recipes/`.

A GGUF recipe names a llama.cpp file type (its per-tensor mix) and optional per-class overrides:

    name: q4_k_m-attn-q8
    format: gguf
    ftype: q4_k_m
    overrides: {attention: Q8_0, ffn_down_exps: Q6_K}

Override keys are tensor classes (attention, dense_mlp, experts, output, embedding) or GGUF base
names (attn_v, ffn_down_exps, ...); the more specific key wins. The router and norms are never
quantized. A GGUF recipe's `method` says how the decoder layers' weights are rounded onto the
GGML grids: `reference` (llama-quantize, with an --imatrix file if given; `grokquant convert`),
`imatrix` or `gptq` (calibrated by `grokquant quantize`: importance from the tokens each expert
actually receives, or GPTQ's error compensation on top of it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from grokquant.errors import GrokquantError
from grokquant.grok.config import GrokConfig
from grokquant.grok.names import gguf_bases, tensor_class
from grokquant.quant.ggml.types import TYPES
from grokquant.quant.gptq import FIELD_TYPES, IntQuantConfig, is_of_type
from grokquant.quant.ggml.mixes import FTYPES

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
# a GGUF recipe's override keys: these classes (the output head is "output", as llama.cpp names it) or a
# GGUF base name of one of their tensors
CLASSES = {key: gguf_bases(cls) for key, cls in (("attention", "attention"), ("dense_mlp", "dense_mlp"),
                                                 ("experts", "experts"), ("output", "lm_head"),
                                                 ("embedding", "embedding"))}
BASE_NAMES = {b for names in CLASSES.values() for b in names}
UNDER_COVERED = ("rtn", "all-tokens", "prior")
CALIBRATION_KEYS = {"min_tokens", "under_covered", "sequential"}


def _check_calibration(recipe) -> None:
    if recipe.under_covered not in UNDER_COVERED:
        raise GrokquantError(f"recipe {recipe.name}: under_covered must be rtn, all-tokens or prior")
    if recipe.min_tokens < 0:
        raise GrokquantError(f"recipe {recipe.name}: min_tokens must be >= 0")


@dataclass
class GGUFRecipe:
    name: str
    ftype: str
    overrides: dict[str, str] = field(default_factory=dict)
    pure: bool = False  # every quantizable tensor gets the ftype's default type (llama-quantize --pure)
    method: str = "reference"  # reference | imatrix | gptq (the last two need `grokquant quantize`)
    damp: float = 0.01  # gptq: fraction of the mean Hessian diagonal added to the diagonal
    refits: int = 0  # gptq: block parameters fitted again to the compensated columns, each row keeping the better
    min_tokens: int = 16  # calibrated methods: experts seeing fewer tokens are "under-covered"
    under_covered: str = "rtn"  # rtn (reference rounding) | all-tokens | prior, as for GPTQ recipes
    sequential: bool = False  # gptq/imatrix: layer l+1 calibrates on the quantized layer l's outputs
    # calibrated methods: bits per weight over all matrices; each tensor's type is then chosen by its measured
    # effect on the output (quantize/allocate.py) instead of the ftype's mix
    target_bpw: float | None = None
    tensor_types: dict[str, str] = field(default_factory=dict)  # GGUF name -> GGML type (the allocation)
    format: str = "gguf"

    @property
    def calibrated(self) -> bool:
        return self.method != "reference"

    def __post_init__(self):
        if self.method not in ("reference", "imatrix", "gptq"):
            raise GrokquantError(f"recipe {self.name}: method must be reference, imatrix or gptq, got {self.method!r}")
        _check_calibration(self)
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 <= self.damp < 1:
            raise GrokquantError(f"recipe {self.name}: damp must be a number in [0, 1), got {self.damp!r}")
        if isinstance(self.refits, bool) or not isinstance(self.refits, int) or not 0 <= self.refits <= 8:
            raise GrokquantError(f"recipe {self.name}: refits must be an integer from 0 to 8")
        if self.ftype not in FTYPES:
            raise GrokquantError(f"recipe {self.name}: unknown ftype {self.ftype!r} (one of {', '.join(FTYPES)})")
        for key, value in self.overrides.items():
            if key not in CLASSES and key not in BASE_NAMES:
                raise GrokquantError(f"recipe {self.name}: unknown tensor class {key!r}")
            if str(value).upper() not in TYPES:
                raise GrokquantError(f"recipe {self.name}: unknown GGML type {value!r} for {key}")
        self.overrides = {k: str(v).upper() for k, v in self.overrides.items()}
        if self.target_bpw is not None:
            if isinstance(self.target_bpw, bool) or not isinstance(self.target_bpw, (int, float)) \
                    or not 1.5 <= self.target_bpw <= 16:
                raise GrokquantError(f"recipe {self.name}: target_bpw must be a number between 1.5 and 16")
            if not self.calibrated:
                raise GrokquantError(f"recipe {self.name}: target_bpw needs a calibrated method (imatrix or gptq)")
        for key, value in self.tensor_types.items():
            if str(value).upper() not in TYPES:
                raise GrokquantError(f"recipe {self.name}: unknown GGML type {value!r} for {key}")

    def override_for(self, gguf_name: str) -> str | None:
        """The override type for a GGUF tensor name, or None."""
        if gguf_name in self.tensor_types:
            return self.tensor_types[gguf_name]
        base = gguf_name.split(".")[-2] if gguf_name.startswith("blk.") else gguf_name.split(".")[0]
        if base in self.overrides:
            return self.overrides[base]
        for cls, members in CLASSES.items():
            if base in members and cls in self.overrides:
                return self.overrides[cls]
        return None


@dataclass
class GPTQRecipe:
    """Integer weight-only quantization per tensor class (None keeps the class in bf16).

        name: gptq-w4g128
        format: gptq
        method: gptq            # or rtn
        experts: {bits: 4, group_size: 128, sym: true, act_order: false}
        attention: {bits: 8, group_size: -1}
        dense_mlp: {bits: 4, group_size: 128}
        min_tokens: 16          # experts seeing fewer calibration tokens are "under-covered"
        under_covered: rtn      # rtn | all-tokens | prior: how under-covered experts are quantized
        sequential: false       # true: layer l+1 calibrates on the quantized layer l's outputs
    """

    name: str = "gptq-w4g128"
    method: str = "gptq"
    experts: IntQuantConfig | None = field(default_factory=IntQuantConfig)
    attention: IntQuantConfig | None = field(default_factory=IntQuantConfig)
    dense_mlp: IntQuantConfig | None = field(default_factory=IntQuantConfig)
    min_tokens: int = 16
    under_covered: str = "rtn"  # rtn | all-tokens | prior (see docs/calibration.md)
    sequential: bool = False  # inputs of layer l+1 from the quantized layer l (GPTQ's intent), else unquantized
    format: str = "gptq"

    @property
    def calibrated(self) -> bool:
        return True

    def __post_init__(self):
        _check_calibration(self)
        if self.method not in ("gptq", "rtn"):
            raise GrokquantError(f"recipe {self.name}: method must be gptq or rtn, got {self.method!r}")
        for cls in ("experts", "attention", "dense_mlp"):
            c = getattr(self, cls)
            if c is not None and c.bits not in (2, 4, 8):
                raise GrokquantError(f"recipe {self.name}: {cls} bits must be 2, 4 or 8 (the GPTQ packing)")

    def config_for(self, tensor_class: str) -> IntQuantConfig | None:
        return getattr(self, tensor_class)

    def check_widths(self, cfg: GrokConfig) -> None:
        """Groups must tile each linear's input exactly: the GPTQ format stores whole groups, and a group
        straddling the end of a row would be read by kernels from the next row."""
        for name, shape in cfg.layer_shapes(0).items():
            cls = tensor_class(name)
            c = self.config_for(cls) if cls in ("experts", "attention", "dense_mlp") else None
            if c is not None and c.group_size != -1 and shape[1] % c.group_size:
                raise GrokquantError(f"recipe {self.name}: {cls} group_size {c.group_size} does not "
                                     f"divide the input width {shape[1]} of {name.split('.', 3)[-1]} "
                                     f"(use -1 or a divisor such as 128)")


def _typed(path: Path, key: str, value, kind: type):
    """`value` as a `kind` (bool, int, float or str), refusing what YAML gave as another type: "128" is not
    a group size, and "maybe" is not a boolean."""
    if not is_of_type(value, kind):
        raise GrokquantError(f"{path}: {key} must be {_KIND_WORDS[kind]}, got {value!r}")
    return float(value) if kind is float else value


_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _fields(path: Path, raw: dict, types: dict[str, type], prefix: str = "") -> dict:
    """The keys of `raw` named in `types`, each checked; a null value leaves the field at its default."""
    return {k: _typed(path, prefix + k, v, types[k]) for k, v in raw.items() if k in types and v is not None}


CALIBRATION_TYPES = {"min_tokens": int, "under_covered": str, "sequential": bool}


def _int_config(path: Path, cls: str, raw) -> IntQuantConfig | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - set(FIELD_TYPES):
        raise GrokquantError(f"{path}: {cls} takes {', '.join(sorted(FIELD_TYPES))}")
    config = IntQuantConfig(**_fields(path, raw, FIELD_TYPES, f"{cls}."))
    if config.group_size != -1 and config.group_size < 1:
        raise GrokquantError(f"{path}: {cls}.group_size must be -1 (one group per row) or positive, got "
                             f"{config.group_size}")
    if not 0 <= config.damp < 1:
        raise GrokquantError(f"{path}: {cls}.damp must be in [0, 1), got {config.damp}")
    if config.block_size < 1:
        raise GrokquantError(f"{path}: {cls}.block_size must be positive, got {config.block_size}")
    return config


def with_target_bpw(recipe: "GGUFRecipe | GPTQRecipe", target_bpw: float) -> GGUFRecipe:
    """The recipe with its per-tensor types to be chosen for `target_bpw` bits per weight."""
    if not isinstance(recipe, GGUFRecipe):
        raise GrokquantError(f"recipe {recipe.name}: --target-bpw applies to GGUF recipes (per-tensor GGML types)")
    return replace(recipe, target_bpw=target_bpw, tensor_types={})


MAX_RECIPE_BYTES = 2**16  # recipes are a few lines; PyYAML takes seconds per 100 kB
MAX_NESTING = 32  # PyYAML's scanner is quadratic in the nesting depth: 10^5 brackets take minutes


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader without aliases or deep nesting: a recipe needs neither, a few nested aliases expand
    into billions of values once printed or compared (the "billion laughs"), and deep brackets are slow."""

    def fetch_flow_collection_start(self, TokenClass):
        if self.flow_level >= MAX_NESTING:
            raise yaml.scanner.ScannerError(None, None, f"nested more than {MAX_NESTING} levels deep", self.get_mark())
        super().fetch_flow_collection_start(TokenClass)

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a recipe",
                                              self.peek_event().start_mark)
        return super().compose_node(parent, index)


def load_recipe(spec: str | Path) -> "GGUFRecipe | GPTQRecipe":
    """A recipe from a YAML path, or by name from `recipes/` (e.g. "q4_k_m", "gptq-w4g128")."""
    path = Path(spec)
    if not path.exists():
        path = RECIPES_DIR / f"{spec}.yaml"
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise GrokquantError(f"{path}: {path.stat().st_size} bytes, too large for a recipe "
                                 f"(at most {MAX_RECIPE_BYTES})")
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)
    except FileNotFoundError:
        raise GrokquantError(f"recipe {spec}: no such file (and no recipes/{spec}.yaml)") from None
    except UnicodeDecodeError:
        raise GrokquantError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        raise GrokquantError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    except (ValueError, RecursionError) as exc:  # a date such as 2001-13-45; thousands of nested brackets
        raise GrokquantError(f"{path}: invalid YAML ({type(exc).__name__}: {str(exc)[:80]!r})") from None
    if not isinstance(raw, dict):
        raise GrokquantError(f"{path}: a recipe is a YAML mapping")
    fmt = raw.get("format", "gguf")
    if fmt == "gptq":
        unknown = set(raw) - {"name", "format", "method", "experts", "attention", "dense_mlp", "description"} \
            - CALIBRATION_KEYS
        if unknown:
            raise GrokquantError(f"{path}: unknown recipe key(s) {', '.join(sorted(unknown))}")
        return GPTQRecipe(**{"name": path.stem} | _fields(path, raw, {"name": str, "method": str} | CALIBRATION_TYPES),
                          **{c: _int_config(path, c, raw[c]) for c in ("experts", "attention", "dense_mlp")
                             if c in raw})
    if fmt != "gguf":
        raise GrokquantError(f"{path}: unknown format {fmt!r} (gguf or gptq)")
    unknown = set(raw) - {"name", "format", "ftype", "overrides", "pure", "method", "damp", "description",
                          "target_bpw", "refits"} - CALIBRATION_KEYS
    if unknown:
        raise GrokquantError(f"{path}: unknown recipe key(s) {', '.join(sorted(unknown))}")
    if "ftype" not in raw:
        raise GrokquantError(f"{path}: missing key ftype")
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise GrokquantError(f"{path}: overrides is a mapping of tensor class to GGML type")
    fields = _fields(path, raw, {"name": str, "pure": bool, "method": str, "damp": float, "target_bpw": float,
                                 "refits": int} | CALIBRATION_TYPES)
    return GGUFRecipe(**{"name": path.stem} | fields, ftype=str(raw["ftype"]).lower(), overrides=overrides)
