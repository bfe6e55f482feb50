"""A GPTQ artifact directory seen as a checkpoint: config, tokenizer, packed and dequantized tensors.

The layout is what `grokquant quantize` writes (auto-gptq "v1", spec quant.md §12): per quantized
linear `<prefix>.qweight` int32 [in·bits/32, out] (codes packed along the input dimension, LSB
first), `<prefix>.qzeros` int32 [n_groups, out·bits/32] (zero − 1, packed along the output
dimension), `<prefix>.scales` fp16 [n_groups, out], `<prefix>.g_idx` int32 [in]; everything else
bf16 under its release name. `config.json` carries `quantization_config`, whose `dynamic` entries
(GPTQModel's convention) override the main settings per module: `+:regex` (or a bare regex) sets
bits/group_size/sym/desc_act, `-:regex` leaves the module unquantized.

`Grok2ForCausalLM.from_checkpoint(GPTQWeights(path))` runs the artifact's dequantized weights.
Tensors are read lazily from the safetensors shards; nothing is loaded at open time.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from grokquant.grok.config import GrokConfig
from grokquant.errors import GrokquantError

PACKED_PARTS = ("qweight", "qzeros", "scales", "g_idx")
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.tok.json"


@dataclass(frozen=True)
class QuantSpec:
    """Integer weight-only settings of one linear."""

    bits: int = 4
    group_size: int = 128  # -1: one group per row
    sym: bool = True
    desc_act: bool = False


@dataclass
class Quantization:
    """`quantization_config` of an artifact: main settings and GPTQModel-style per-module overrides."""

    default: QuantSpec
    dynamic: dict[str, dict] = field(default_factory=dict)  # "+:regex" / "-:regex" -> overrides
    raw: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, raw: dict) -> "Quantization":
        method = raw.get("quant_method", "gptq")
        if method != "gptq":
            raise GrokquantError(f"quantization_config: quant_method {method!r}, expected 'gptq'")
        if raw.get("checkpoint_format", "gptq") != "gptq":
            raise GrokquantError(f"quantization_config: checkpoint_format {raw['checkpoint_format']!r} "
                                 "(only the v1 'gptq' format is read)")
        default = QuantSpec(int(raw.get("bits", 4)), int(raw.get("group_size", 128)), bool(raw.get("sym", True)),
                            bool(raw.get("desc_act", False)))
        return cls(default, dict(raw.get("dynamic") or {}), raw)

    def for_module(self, module: str) -> QuantSpec | None:
        """The settings of linear `module` (e.g. "model.layers.0.mlp.up_proj"); None if left unquantized."""
        for key, overrides in self.dynamic.items():
            sign, pattern = (key[0], key[2:]) if key[:2] in ("+:", "-:") else ("+", key)
            if not re.match(pattern, module):
                continue
            if sign == "-":
                return None
            d = self.default
            return QuantSpec(int(overrides.get("bits", d.bits)), int(overrides.get("group_size", d.group_size)),
                             bool(overrides.get("sym", d.sym)), bool(overrides.get("desc_act", d.desc_act)))
        return self.default


@dataclass
class PackedLinear:
    """The four stored tensors of one quantized linear and the settings that read them."""

    qweight: torch.Tensor  # int32 [in·bits/32, out]
    qzeros: torch.Tensor  # int32 [n_groups, out·bits/32]
    scales: torch.Tensor  # fp16 [n_groups, out]
    g_idx: torch.Tensor  # int32 [in]
    bits: int
    group_size: int  # -1: one group per row
    sym: bool

    @property
    def in_features(self) -> int:
        return self.g_idx.shape[0]

    @property
    def out_features(self) -> int:
        return self.scales.shape[1]

    @property
    def n_groups(self) -> int:
        return self.scales.shape[0]

    @property
    def act_order(self) -> bool:
        """True when g_idx is not the plain `i // group_size` (groups visited in activation order)."""
        gs = self.group_size if self.group_size > 0 else self.in_features
        plain = torch.arange(self.in_features, device=self.g_idx.device) // gs
        return not torch.equal(self.g_idx.long(), plain)

    def codes(self) -> torch.Tensor:
        """Unsigned codes, uint8 [in, out]."""
        return unpack_rows(self.qweight, self.bits, self.in_features).to(torch.uint8)

    def zeros(self) -> torch.Tensor:
        """Integer zero points, [n_groups, out] int32 (the v1 "stored + 1")."""
        stored = unpack_rows(self.qzeros.t(), self.bits, self.out_features).t()
        # as auto-gptq's kernels read it: a stored 2^bits − 1 is zero 2^bits (our quantizer keeps zero ≥ 1)
        return (stored + 1).to(torch.int32)

    def dequantize(self) -> torch.Tensor:
        """W [out, in] float32: scale[g(i), o] · (code[i, o] − zero[g(i), o])."""
        g = self.g_idx.long()
        W = self.scales.float()[g] * (self.codes().float() - self.zeros()[g].float())
        return W.t().contiguous()

    def to(self, device) -> "PackedLinear":
        return PackedLinear(self.qweight.to(device), self.qzeros.to(device), self.scales.to(device),
                            self.g_idx.to(device), self.bits, self.group_size, self.sym)


def unpack_rows(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """int32 [n·bits/32, m] -> int32 [n, m]: value k of a word sits at bits·k, LSB first."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device).view(1, per, 1)
    # arithmetic shifts sign-extend the top field; the mask keeps only the field's own bits
    values = (words.to(torch.int32)[:, None, :] >> shifts) & (2 ** bits - 1)
    values = values.reshape(-1, words.shape[1])
    if values.shape[0] != n:
        raise GrokquantError(f"packed rows hold {values.shape[0]} values, expected {n}")
    return values


class GPTQWeights:
    """A GPTQ artifact directory; `.tensor(name)` gives release-named float weights."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise GrokquantError(f"{self.path}: no config.json (not a GPTQ artifact directory)")
        raw = json.loads(config_file.read_text())
        if "quantization_config" not in raw:
            raise GrokquantError(f"{config_file}: no quantization_config (not a GPTQ artifact)")
        self.quantization = Quantization.from_dict(raw.pop("quantization_config"))
        self.config = GrokConfig.from_dict(raw, str(config_file))
        tok = self.path / TOKENIZER_FILE
        self.tokenizer_path = tok if tok.is_file() else None
        self.where = self._weight_map()
        self._open: dict[str, object] = {}

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            return dict(json.loads(index.read_text())["weight_map"])
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            raise GrokquantError(f"{self.path}: no .safetensors files")
        where = {}
        for shard in shards:
            with safe_open(str(shard), "pt") as f:
                where.update({k: shard.name for k in f.keys()})
        return where

    # ---- raw access ----------------------------------------------------------------------------
    def _stored(self, name: str) -> torch.Tensor:
        shard = self.where.get(name)
        if shard is None:
            raise GrokquantError(f"{name} not in {self.path}")
        f = self._open.get(shard)
        if f is None:
            f = self._open[shard] = safe_open(str(self.path / shard), "pt")
        return f.get_tensor(name)

    def names(self) -> list[str]:
        """Release names of every weight the artifact represents (quantized ones under `.weight`)."""
        out = []
        for name in self.where:
            base, _, part = name.rpartition(".")
            if part == "qweight":
                out.append(base + ".weight")
            elif part not in PACKED_PARTS:
                out.append(name)
        return out

    def is_quantized(self, name: str) -> bool:
        return name.endswith(".weight") and name[: -len(".weight")] + ".qweight" in self.where

    def quantized(self, name: str) -> PackedLinear | None:
        """The packed tensors of a quantized linear (release name `<prefix>.weight`), else None."""
        if not self.is_quantized(name):
            return None
        prefix = name[: -len(".weight")]
        qweight, qzeros, scales, g_idx = (self._stored(f"{prefix}.{p}") for p in PACKED_PARTS)
        spec = self.quantization.for_module(prefix) or self.quantization.default
        in_features, out_features = g_idx.shape[0], scales.shape[1]
        bits = 32 * qweight.shape[0] // in_features  # what the shapes say; must agree with the config
        if bits != spec.bits or qweight.shape[1] != out_features or qzeros.shape[1] * 32 // bits != out_features:
            raise GrokquantError(f"{prefix}: packed shapes {list(qweight.shape)}/{list(qzeros.shape)} do not fit "
                                 f"{spec.bits}-bit codes for a [{out_features}, {in_features}] matrix")
        group_size = -1 if scales.shape[0] == 1 else spec.group_size
        return PackedLinear(qweight, qzeros, scales, g_idx, bits, group_size, spec.sym)

    def tensor(self, name: str) -> torch.Tensor:
        """A release-named tensor: dequantized float32 for quantized linears, the stored tensor otherwise."""
        packed = self.quantized(name)
        return packed.dequantize() if packed is not None else self._stored(name)

    def close(self) -> None:
        self._open.clear()  # safetensors handles unmap when released

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def is_gptq_dir(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return "quantization_config" in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
