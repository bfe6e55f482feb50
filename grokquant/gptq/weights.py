"""A GPTQ artifact directory seen as a checkpoint: config, tokenizer, packed and dequantized tensors.

The layout is what `grokquant quantize` writes: per quantized linear the four tensors of
grokquant.gptq.layout (auto-gptq's "v1" layout), everything else bf16 under its release name.
`config.json` carries `quantization_config` (grokquant.gptq.config), whose GPTQModel `dynamic`
entries override the main settings per module.

`Grok2ForCausalLM.from_checkpoint(GPTQWeights(path))` runs the artifact's dequantized weights.
Tensors are read lazily from the safetensors shards; nothing is loaded at open time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from grokquant.errors import GrokquantError
from grokquant.gptq.config import JSON_KEYS, Quantization, from_json
from grokquant.gptq.layout import PACKED_PARTS, PackedLinear
from grokquant.grok.checkpoint import INDEX_FILE, TOKENIZER_FILE
from grokquant.grok.config import GrokConfig
from grokquant.io.safetensors_file import read_header


class GPTQWeights:
    """A GPTQ artifact directory; `.tensor(name)` gives release-named float weights."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise GrokquantError(f"{self.path}: no config.json (not a GPTQ artifact directory)")
        raw = _read_json(config_file)
        if not isinstance(raw, dict) or "quantization_config" not in raw:
            raise GrokquantError(f"{config_file}: no quantization_config (not a GPTQ artifact)")
        try:
            self.quantization = Quantization.from_dict(raw.pop("quantization_config"))
        except GrokquantError as exc:
            raise GrokquantError(f"{config_file}: {exc}") from None
        _check_quantize_config(self.path / "quantize_config.json", self.quantization)
        self.config = GrokConfig.from_dict(raw, str(config_file))
        tok = self.path / TOKENIZER_FILE
        self.tokenizer_path = tok if tok.is_file() else None
        self.where = self._weight_map()
        self._open: dict[str, object] = {}

    def _weight_map(self) -> dict[str, str]:
        """Tensor name -> shard, every shard's header checked (present, complete, consistent with the index)
        so that a damaged artifact is refused when opened rather than midway through a run."""
        index = self.path / INDEX_FILE
        listed = None
        if index.is_file():
            raw = _read_json(index)
            listed = raw.get("weight_map") if isinstance(raw, dict) else None
            if not isinstance(listed, dict) or not all(isinstance(v, str) and "/" not in v and v.isprintable()
                                                       for v in listed.values()):  # file names go into messages
                raise GrokquantError(f"{index}: not a safetensors index (no weight_map of tensor -> file)")
            shards = sorted({self.path / v for v in listed.values()})
        else:
            shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            raise GrokquantError(f"{self.path}: no .safetensors files")
        where = {}
        for shard in shards:
            if not shard.is_file():
                raise GrokquantError(f"{self.path}: {INDEX_FILE} lists {shard.name}, which is missing")
            entries, _, problems = read_header(shard)
            if problems:
                raise GrokquantError(f"{self.path}: {problems[0]}" + (f" (and {len(problems) - 1} more problems)"
                                                                      if len(problems) > 1 else ""))
            where.update({e.name: shard.name for e in entries})
        if listed is not None:
            wrong = sorted(n for n, f in listed.items() if where.get(n) != f)
            if wrong:
                raise GrokquantError(f"{index}: {len(wrong)} tensor(s) not in the file it names, e.g. {wrong[0]}")
            where = dict(listed)
        return where

    # ---- raw access ----------------------------------------------------------------------------
    def _stored(self, name: str) -> torch.Tensor:
        shard = self.where.get(name)
        if shard is None:
            raise GrokquantError(f"{name} not in {self.path}")
        try:
            f = self._open.get(shard)
            if f is None:
                f = self._open[shard] = safe_open(str(self.path / shard), "pt")
            return f.get_tensor(name)
        except SafetensorError as exc:  # what read_header lets pass and the library refuses (e.g. gaps between tensors)
            raise GrokquantError(f"{self.path / shard}: {' '.join(str(exc).split())[:200]}") from None

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
        spec = self.quantization.for_module(prefix) or self.quantization.default
        parts = {p: self._stored(f"{prefix}.{p}") for p in PACKED_PARTS}
        return PackedLinear.read(prefix, parts, spec.bits, spec.group_size, spec.sym)

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


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (ValueError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8
        raise GrokquantError(f"{path}: not valid JSON ({str(exc)[:80]})") from None


def _check_quantize_config(path: Path, quantization: Quantization) -> None:
    """auto-gptq reads quantize_config.json, transformers and we config.json's quantization_config: when both
    are there they must agree, or the same directory would mean two different models."""
    if not path.exists():
        return
    raw = _read_json(path)
    try:
        theirs = from_json(raw)
    except GrokquantError as exc:
        raise GrokquantError(f"{path}: {exc}") from None
    ours = quantization.default
    for name, key in JSON_KEYS.items():
        if key in raw and getattr(theirs, name) != getattr(ours, name):
            raise GrokquantError(f"{path}: {key} {getattr(theirs, name)!r} disagrees with config.json's "
                                 f"quantization_config ({getattr(ours, name)!r})")


def is_gptq_dir(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return "quantization_config" in json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
