"""Evaluation text, cut into the token windows every artifact is scored on.

Windows follow llama-perplexity: the text's tokens are cut into windows of `ctx` tokens starting every
`stride` tokens (default `ctx`: non-overlapping chunks), and each window scores only its last
`min(stride, ctx - ctx//2 - 1)` tokens, so that every scored token has seen at least half a window of
context. With the default stride this is exactly llama-perplexity's choice (the logits of positions
ctx/2 .. ctx-2 predicting tokens ctx/2+1 .. ctx-1); with a smaller stride the scored tails tile the
text without gaps. No BOS is inserted (Grok 2's tokenizer has none).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from grokquant.data.corpus import builtin_text, split_documents
from grokquant.errors import GrokquantError

TOKENIZER_PROBE_CHARS = 2000  # text tokenized by every artifact to check they agree


def document_tokens(tok, docs: list[str]) -> torch.Tensor:
    """Token ids of the documents, each followed by EOS."""
    ids: list[int] = []
    for doc in docs:
        ids += tok.encode(doc, allow_special=False) + [tok.eos_id]
    return torch.tensor(ids, dtype=torch.long)


def evaluation_tokens(tok, data: str | Path) -> torch.Tensor:
    """`builtin` is the built-in corpus's held-out split; a text file is tokenized whole (as
    llama-perplexity does); folders and JSON Lines are read as by `calibrate --data`."""
    if str(data) == "builtin":
        return document_tokens(tok, split_documents("heldout"))
    from grokquant.data.documents import load_documents

    return document_tokens(tok, load_documents(data))


def sample_text(data: str | Path) -> str:
    """The start of the evaluation text, for checking that artifacts tokenize alike."""
    if str(data) == "builtin":
        return builtin_text("heldout", TOKENIZER_PROBE_CHARS)
    from grokquant.data.documents import load_documents

    return "\n\n".join(load_documents(data))[:TOKENIZER_PROBE_CHARS]


@dataclass
class Windows:
    tokens: torch.Tensor  # [n_windows, ctx]
    stride: int
    n_score: int  # tokens scored at the end of each window

    @property
    def ctx(self) -> int:
        return self.tokens.shape[1]

    @property
    def logit_span(self) -> slice:
        """Positions whose logits are scored (each predicts the next token)."""
        return slice(self.ctx - self.n_score - 1, self.ctx - 1)

    def targets(self) -> torch.Tensor:
        return self.tokens[:, self.ctx - self.n_score:]


def make_windows(ids: torch.Tensor, ctx: int = 512, stride: int | None = None, max_windows: int | None = None
                 ) -> Windows:
    stride = stride or ctx
    if ctx < 4 or stride < 1:
        raise GrokquantError(f"--ctx must be at least 4 and --stride positive (got {ctx}, {stride})")
    starts = list(range(0, len(ids) - ctx + 1, stride))[:max_windows]
    if not starts:
        raise GrokquantError(f"the text has {len(ids)} tokens, fewer than one window of --ctx {ctx}")
    tokens = torch.stack([ids[s:s + ctx] for s in starts])
    return Windows(tokens, stride, min(stride, ctx - ctx // 2 - 1))
