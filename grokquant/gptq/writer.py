"""A GPTQ artifact's files besides the shards: index, quantize_config.json, config.json, tokenizer.

quantize_config.json is what auto-gptq reads; config.json is the model's config with the same dict
under `quantization_config`, as transformers keeps it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

from grokquant.grok.checkpoint import INDEX_FILE, TOKENIZER_FILE
from grokquant.gptq.config import quantization_config


def write_metadata(work: Path, ckpt, recipe, files: list[str]) -> None:
    """Index of the shards `files` in `work`, both configs for `recipe`, and `ckpt`'s tokenizer."""
    from safetensors import safe_open

    weight_map = {}
    for f in files:
        with safe_open(str(work / f), "pt") as sf:
            weight_map.update({k: f for k in sf.keys()})
    (work / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    quant = quantization_config(recipe)
    (work / "quantize_config.json").write_text(json.dumps(quant, indent=2))
    config = asdict(ckpt.config)
    config["quantization_config"] = quant
    (work / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(ckpt.tokenizer_path, work / TOKENIZER_FILE)
