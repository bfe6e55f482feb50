"""Grok 2's `tokenizer.tok.json` (a tiktoken export): loading, encoding, chat format, and a small
byte-level BPE trainer used to make synthetic checkpoints.

File format: `regular_tokens` and `special_tokens` are lists of {"bytes": [...], "token": id};
a regular token's id is also its merge rank. `word_split` must be "V1", which selects PAT_STR_B.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import regex
import tiktoken

from grokquant.errors import CheckpointError

PAT_STR_B = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
             r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
SEPARATOR = "<|separator|>"
EOS = "<|eos|>"
PAD = "<|pad|>"


@dataclass
class GrokTokenizer:
    """A tiktoken Encoding plus the ids the model and the GGUF exporter need."""

    encoding: tiktoken.Encoding
    ranks: dict[bytes, int]
    special: dict[str, int]
    path: Path | None = None

    @property
    def n_vocab(self) -> int:
        return self.encoding.max_token_value + 1

    @property
    def eos_id(self) -> int:
        return self.special.get(EOS, 2)

    @property
    def separator_id(self) -> int | None:
        return self.special.get(SEPARATOR)

    @property
    def pad_id(self) -> int | None:
        return self.special.get(PAD)

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids; special-token text is recognised when allow_special, else encoded as text."""
        if allow_special:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode(text, disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.encoding.decode_bytes(ids)


def format_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Grok 2's chat format: `Human: ...<|separator|>\\n\\n` turns, ending with `Assistant:`."""
    roles = {"system": "System", "user": "Human", "assistant": "Assistant"}
    out = []
    for m in messages:
        role = roles.get(m["role"])
        if role is None:
            raise ValueError(f"unknown chat role {m['role']!r}")
        content = m["content"] if m["role"] == "assistant" else m["content"].strip()
        out.append(f"{role}: {content}{SEPARATOR}\n\n")
    if add_generation_prompt:
        out.append("Assistant:")
    return "".join(out)


# ---- loading ---------------------------------------------------------------------------------

def _token_list(raw: dict, key: str, path: Path) -> list[tuple[bytes, int]]:
    items = raw.get(key)
    if not isinstance(items, list):
        raise CheckpointError(f"{path}: `{key}` missing or not a list")
    out = []
    for item in items:
        try:
            data, tid = item["bytes"], item["token"]
            # bytes(n) of an int n would allocate n zero bytes; ids are 32-bit in tiktoken
            if not isinstance(data, list) or isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid < 2**31:
                raise ValueError
            data = bytes(data)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed entry in `{key}`: {repr(item)[:60]}") from None
        out.append((data, tid))
    return out


def load_tokenizer(path: str | Path) -> GrokTokenizer:
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or UTF-8
        raise CheckpointError(f"{path}: unreadable tokenizer ({type(exc).__name__})") from None
    return tokenizer_from_dict(raw, path)


def tokenizer_from_dict(raw, path: Path) -> GrokTokenizer:
    """A tokenizer from the parsed tok.json `raw`; `path` names it in errors."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: unreadable tokenizer (not a JSON object)")
    if raw.get("word_split") != "V1":
        raise CheckpointError(f"{path}: word_split must be \"V1\", got {raw.get('word_split')!r}")
    regular = _token_list(raw, "regular_tokens", path)
    specials = _token_list(raw, "special_tokens", path)
    ranks = dict(regular)
    if len(ranks) != len(regular):
        raise CheckpointError(f"{path}: duplicate byte sequences in regular_tokens")
    missing_bytes = [b for b in range(256) if bytes([b]) not in ranks]
    if missing_bytes:
        raise CheckpointError(f"{path}: {len(missing_bytes)} single-byte tokens missing (e.g. byte {missing_bytes[0]})")
    try:
        special = {data.decode("utf-8"): tid for data, tid in specials}
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: a special token is not valid UTF-8") from None
    ids = list(ranks.values()) + list(special.values())
    if len(set(ids)) != len(ids):
        raise CheckpointError(f"{path}: token ids are not unique")
    try:
        enc = tiktoken.Encoding(name=path.stem, pat_str=raw.get("pat_str") or PAT_STR_B,
                                mergeable_ranks=ranks, special_tokens=special)
    except Exception as exc:  # tiktoken raises plain ValueError/RuntimeError on bad tables
        raise CheckpointError(f"{path}: unusable tokenizer ({exc})") from None
    return GrokTokenizer(enc, ranks, special, path)


# ---- training (synthetic checkpoints) ---------------------------------------------------------

def train_bpe(text: str, vocab_size: int, specials: list[str], special_ids: dict[str, int] | None = None
              ) -> dict:
    """Learn a byte-level BPE vocabulary of exactly `vocab_size` ids; return a tok.json dict.

    Specials take the ids in `special_ids` (default: 0, 1, 2, ... in order); regular tokens fill the
    remaining ids in merge order, starting with the 256 single bytes, so id order is rank order.
    """
    special_ids = special_ids or {s: i for i, s in enumerate(specials)}
    n_regular = vocab_size - len(specials)
    if n_regular < 256:
        raise ValueError(f"vocab_size {vocab_size} leaves fewer than 256 regular tokens")
    merges = _learn_merges(text, n_regular - 256)
    taken = set(special_ids.values())
    free_ids = (i for i in range(vocab_size) if i not in taken)
    regular = [bytes([b]) for b in range(256)] + merges
    regular_tokens = [{"bytes": list(tok), "token": next(free_ids)} for tok in regular]
    special_tokens = [{"bytes": list(s.encode()), "token": special_ids[s]} for s in specials]
    return {"regular_tokens": regular_tokens, "special_tokens": special_tokens, "word_split": "V1",
            "pat_str": PAT_STR_B, "vocab_size": vocab_size,
            "default_allowed_special": [list(s.encode()) for s in specials]}


def _learn_merges(text: str, n_merges: int) -> list[bytes]:
    words = Counter(regex.findall(PAT_STR_B, text))
    seqs = [[bytes([b]) for b in w.encode("utf-8")] for w in words]
    freqs = list(words.values())
    pair_count: Counter = Counter()
    where: dict[tuple[bytes, bytes], set[int]] = defaultdict(set)
    for i, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:]):
            pair_count[pair] += freqs[i]
            where[pair].add(i)

    merges: list[bytes] = []
    while len(merges) < n_merges:
        if not pair_count:
            # the text ran out of pairs: pad with unused byte pairs so the vocabulary is full
            merges.append(_unused_token(merges))
            continue
        best = max(pair_count.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merged = best[0] + best[1]
        merges.append(merged)
        for i in where.pop(best):
            seq, f = seqs[i], freqs[i]
            for pair in zip(seq, seq[1:]):
                pair_count[pair] -= f
                if pair_count[pair] <= 0:
                    del pair_count[pair]
            out, j = [], 0
            while j < len(seq):
                if j + 1 < len(seq) and seq[j] == best[0] and seq[j + 1] == best[1]:
                    out.append(merged)
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            seqs[i] = out
            for pair in zip(out, out[1:]):
                pair_count[pair] += f
                where[pair].add(i)
        pair_count.pop(best, None)
    return merges


def _unused_token(merges: list[bytes]) -> bytes:
    have = set(merges)
    for a in range(256):
        for b in range(256):
            if bytes([a, b]) not in have:
                return bytes([a, b])
    raise ValueError("vocabulary too large for the training text")
