"""`tokenizer.tok.json` -> a GGUF `gpt2` BPE vocabulary, as llama.cpp's `convert_hf_to_gguf.py` builds
one from tiktoken ranks.

Tokens are byte strings mapped through GPT-2's byte->unicode table; merges are rebuilt from the
tiktoken ranks: a token's merge is the last step of running BPE on its own bytes with only lower
ranks, so emitting merges in rank order reproduces tiktoken's priorities.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from grokquant.grok.tokenizer import EOS, PAD, SEPARATOR, GrokTokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Renders tokenizer.format_chat's format; contains the substring llama.cpp uses to recognise the
# built-in `grok-2` template (`'Assistant: '  + message['content'] + '<|separator|>`).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ 'System: ' + message['content'] | trim + '<|separator|>\n\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'Human: ' + message['content'] | trim + '<|separator|>\n\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'Assistant: '  + message['content'] + '<|separator|>\n\n' }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def token_text(data: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in data)


def split_by_lower_ranks(ranks: dict[bytes, int], token: bytes) -> list[bytes]:
    """Byte-level BPE of `token` using only merges ranked below its own rank."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while True:
        best, best_rank = None, limit
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best is None:
            return parts
        parts[best:best + 2] = [parts[best] + parts[best + 1]]


@dataclass
class GGUFVocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    eos_id: int
    pad_id: int | None
    eot_id: int | None
    unreachable: int  # regular tokens whose bytes do not split into exactly two lower-ranked tokens


def build_vocab(tok: GrokTokenizer, n_vocab: int) -> GGUFVocab:
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    by_rank = sorted(tok.ranks.items(), key=lambda kv: kv[1])
    for data, tid in by_rank:
        tokens[tid], types[tid] = token_text(data), NORMAL
    for text, tid in tok.special.items():
        tokens[tid], types[tid] = text, CONTROL
    merges, unreachable = [], 0
    for data, _ in by_rank:
        if len(data) < 2:
            continue
        parts = split_by_lower_ranks(tok.ranks, data)
        if len(parts) != 2:
            unreachable += 1
            continue
        merges.append(f"{token_text(parts[0])} {token_text(parts[1])}")
    return GGUFVocab(tokens, types, merges, tok.special.get(EOS, 2), tok.special.get(PAD),
                     tok.special.get(SEPARATOR), unreachable)


def tokenizer_from_gguf(metadata: dict) -> GrokTokenizer:
    """Rebuild the tiktoken tokenizer from a GGUF vocabulary written by `build_vocab`."""
    import tiktoken

    from grokquant.grok.tokenizer import PAT_STR_B

    from grokquant.errors import GrokquantError

    def bad(problem):
        return GrokquantError(f"GGUF vocabulary: {problem}")

    # the metadata is untrusted: checked here so that tiktoken never sees a table it would fail on
    tokens, types = metadata.get("tokenizer.ggml.tokens"), metadata.get("tokenizer.ggml.token_type")
    if not (isinstance(tokens, list) and isinstance(types, list) and len(tokens) == len(types) and tokens
            and all(isinstance(t, str) for t in tokens) and all(isinstance(t, int) for t in types)):
        raise bad("tokenizer.ggml.tokens and token_type are not two lists of the same length (strings, integers)")
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    ranks, special = {}, {}
    for tid, (text, ttype) in enumerate(zip(tokens, types)):
        if ttype == NORMAL:
            if not text or any(c not in to_byte for c in text):
                raise bad(f"token {tid} {text[:20]!r} is not in GPT-2's byte encoding")
            data = bytes(to_byte[c] for c in text)
            if ranks.setdefault(data, tid) != tid:
                raise bad(f"tokens {ranks[data]} and {tid} have the same bytes")
        elif ttype == CONTROL:
            if special.setdefault(text, tid) != tid:
                raise bad(f"control tokens {special[text]} and {tid} are both {text[:20]!r}")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:  # tiktoken cannot encode text holding a byte without a token
        raise bad(f"{len(missing)} single-byte tokens missing (e.g. byte {missing[0]})")
    try:
        enc = tiktoken.Encoding(name="gguf", pat_str=PAT_STR_B, mergeable_ranks=ranks, special_tokens=special)
    except Exception as exc:  # tiktoken raises plain ValueError/RuntimeError on bad tables
        raise bad(f"unusable ({type(exc).__name__})") from None
    return GrokTokenizer(enc, ranks, special)
