"""Calibration text: a text file, a folder of text files, JSON Lines, or the built-in corpus, tokenized
with the Grok 2 tokenizer and packed into fixed-length windows, seeded and reproducible."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from grokquant.errors import GrokquantError
from grokquant.grok.tokenizer import GrokTokenizer, format_chat

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}


def load_documents(data: str | Path, chat: bool = False) -> list[str]:
    """Documents from `builtin`, a text file, a folder of text files, or a .jsonl file.

    JSON Lines take a `text` field, or `prompt` and `response` fields (rendered in Grok 2's chat
    format when `chat`, else joined by a blank line).
    """
    if str(data) == "builtin":  # the training split: the held-out documents are for evaluation
        from grokquant.data.corpus import split_documents

        return split_documents("train")
    path = Path(data)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES | {".jsonl"})
        if not files:
            raise GrokquantError(f"{path}: no .txt/.md/.jsonl files inside")
        return [doc for f in files for doc in load_documents(f, chat)]
    if not path.is_file():
        raise GrokquantError(f"{path}: no such calibration file or folder (or use `builtin`)")
    if path.suffix.lower() == ".jsonl":
        return _jsonl(path, chat)
    try:
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError:
        raise GrokquantError(f"{path}: not UTF-8 text") from None


def _jsonl(path: Path, chat: bool) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise GrokquantError(f"{path}: not UTF-8 text") from None
    docs = []
    # lines end at "\n" only: str.splitlines would also cut at U+2028 or U+0085, which JSON allows inside strings
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            raise GrokquantError(f"{path}:{i}: not valid JSON") from None
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            docs.append(obj["text"])
        elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
            if chat:
                docs.append(format_chat([{"role": "user", "content": obj["prompt"]},
                                         {"role": "assistant", "content": obj["response"]}], add_generation_prompt=False))
            else:
                docs.append(obj["prompt"] + "\n\n" + obj["response"])
        else:
            raise GrokquantError(f"{path}:{i}: expected a `text` field or `prompt` and `response`")
    return docs


def calibration_tokens(tok: GrokTokenizer, data: str | Path, n_tokens: int, seq_len: int, seed: int = 0,
                       chat: bool = False) -> torch.Tensor:
    """[n_windows, seq_len] token ids: documents in a seeded order, joined by EOS, cut into windows."""
    if n_tokens < seq_len or seq_len < 1:
        raise GrokquantError(f"--tokens ({n_tokens}) must be at least --seq-len ({seq_len}) and positive")
    docs = load_documents(data, chat)
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    need = (n_tokens // seq_len) * seq_len
    ids: list[int] = []
    for i in order:
        ids += tok.encode(docs[i], allow_special=chat) + [tok.eos_id]
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise GrokquantError(f"calibration data has {len(ids)} tokens, {need} requested")
    return torch.tensor(ids[:need], dtype=torch.long).view(-1, seq_len)
