"""`quantization_config`: IntQuantConfig as the JSON of a GPTQ artifact, written and read back.

The keys are auto-gptq's (`BaseQuantizeConfig`: `desc_act` is our `act_order`, `damp_percent` our
`damp`); `dynamic` holds GPTQModel's per-module overrides: `+:regex` (or a bare regex) sets
bits/group_size/sym/desc_act, `-:regex` leaves the module unquantized.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from grokquant.errors import GrokquantError
from grokquant.gptq.layout import PACKABLE_BITS
from grokquant.quant.gptq import FIELD_TYPES, IntQuantConfig, is_of_type

# IntQuantConfig field -> JSON key, in the order the main settings are written
JSON_KEYS = {"bits": "bits", "group_size": "group_size", "damp": "damp_percent", "act_order": "desc_act",
             "static_groups": "static_groups", "sym": "sym"}
OVERRIDE_FIELDS = ("bits", "group_size", "sym", "act_order")  # what a `dynamic` entry sets
CLASS_MODULES = (("attention", r".*\.self_attn\..*"), ("dense_mlp", r".*\.mlp\..*"), ("experts", r".*\.experts\..*"))


def to_json(c: IntQuantConfig, names=tuple(JSON_KEYS)) -> dict:
    return {JSON_KEYS[n]: getattr(c, n) for n in names}


def from_json(raw: dict, base: IntQuantConfig = IntQuantConfig(), names=tuple(JSON_KEYS)) -> IntQuantConfig:
    """`base` with the JSON's values for the fields `names` (those the JSON has), each of its field's type:
    an artifact is untrusted input, and `"bits": "4"` or `"sym": "yes"` would otherwise be read as something."""
    if not isinstance(raw, dict):
        raise GrokquantError(f"quantization_config: expected a JSON object, got {raw!r:.40}")
    values = {}
    for n in names:
        if JSON_KEYS[n] not in raw:
            continue
        v, kind = raw[JSON_KEYS[n]], FIELD_TYPES[n]
        if not is_of_type(v, kind):
            raise GrokquantError(f"quantization_config: {JSON_KEYS[n]} is {v!r:.40}, expected {kind.__name__}")
        values[n] = kind(v)
    c = replace(base, **values)
    if c.bits not in PACKABLE_BITS or not (c.group_size == -1 or c.group_size >= 1):
        raise GrokquantError(f"quantization_config: bits {c.bits} / group_size {c.group_size} (bits "
                             f"{', '.join(map(str, PACKABLE_BITS))}; group_size -1 or positive)")
    return c


def quantization_config(recipe) -> dict:
    """A GPTQ recipe's quantization_config: the experts' settings (else the first class quantized) as
    the main ones, the classes that differ as `dynamic` overrides."""
    main = recipe.experts or recipe.dense_mlp or recipe.attention or IntQuantConfig()
    dynamic = {}
    for cls, modules in CLASS_MODULES:
        c = recipe.config_for(cls)
        if c is None:
            dynamic["-:" + modules] = {}
        elif c != main:
            dynamic["+:" + modules] = to_json(c, OVERRIDE_FIELDS)
    quant = {**to_json(main), "true_sequential": False, "quant_method": "gptq", "checkpoint_format": "gptq",
             "model_file_base_name": "model",
             "meta": {"quantizer": "grokquant", "recipe": recipe.name, "method": recipe.method}}
    if dynamic:
        quant["dynamic"] = dynamic
    return quant


@dataclass
class Quantization:
    """`quantization_config` of an artifact: main settings and GPTQModel-style per-module overrides."""

    default: IntQuantConfig
    dynamic: dict[str, dict] = field(default_factory=dict)  # "+:regex" / "-:regex" -> overrides
    raw: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict) -> "Quantization":
        if not isinstance(raw, dict):
            raise GrokquantError("quantization_config: expected a JSON object")
        method = raw.get("quant_method", "gptq")
        if method != "gptq":
            raise GrokquantError(f"quantization_config: quant_method {method!r}, expected 'gptq'")
        if raw.get("checkpoint_format", "gptq") != "gptq":
            raise GrokquantError(f"quantization_config: checkpoint_format {raw['checkpoint_format']!r} "
                                 "(only the v1 'gptq' format is read)")
        dynamic = raw.get("dynamic") or {}
        if not isinstance(dynamic, dict) or not all(isinstance(k, str) and isinstance(v, dict)
                                                    for k, v in dynamic.items()):
            raise GrokquantError("quantization_config: dynamic must map module patterns to settings")
        for key in dynamic:
            try:
                re.compile(key[2:] if key[:2] in ("+:", "-:") else key)
            except re.error as exc:
                raise GrokquantError(f"quantization_config: dynamic pattern {key!r}: {exc}") from None
        return cls(from_json(raw), dict(dynamic), raw)

    def for_module(self, module: str) -> IntQuantConfig | None:
        """The settings of linear `module` (e.g. "model.layers.0.mlp.up_proj"); None if left unquantized."""
        for key, overrides in self.dynamic.items():
            sign, pattern = (key[0], key[2:]) if key[:2] in ("+:", "-:") else ("+", key)
            if not re.match(pattern, module):
                continue
            if sign == "-":
                return None
            return from_json(overrides, self.default, OVERRIDE_FIELDS)
        return self.default
