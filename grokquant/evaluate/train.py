"""Train a small Grok 2 on real English text, on CPU, and save it in the release's layout.

Random weights cannot show whether quantization hurts; a model that has learned something can. The
model is `grokquant.model.Grok2ForCausalLM` itself (residual MoE, sandwich norms, the three softcaps,
8 experts top-2, SGLang semantics), its parameters made trainable. Every row length is a multiple of 256
so that every K-quant applies to every tensor. The text is the built-in corpus's training split (or a
given file), tokenized with a byte-level BPE trained on the same text. A Switch-style load-balancing
loss keeps all experts in use. The result is written by `synth.write_checkpoint` (bf16, 8-way TP
expert slices, config.json, tokenizer.tok.json) plus a `training.json` record.

Deterministic for a given seed and number of threads (matmul reductions depend on the thread count).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from grokquant.grok.config import GrokConfig
from grokquant.data.corpus import split_documents
from grokquant.errors import GrokquantError
from grokquant.evaluate.windows import document_tokens
from grokquant.grok.model import Grok2ForCausalLM, rope_cos_sin, softcap
from grokquant.grok.synth import PRESETS, SPECIALS, TOKENIZER_TEXT_CHARS, slices_of, synth_config, write_checkpoint
from grokquant.grok.tokenizer import tokenizer_from_dict, train_bpe
from grokquant.io.paths import replacing

# The committed fixture: 2 layers, hidden 256, dense MLP and every expert 256 wide (the narrowest that
# keeps K-quant rows whole), vocabulary 512. ~4.2M parameters, 8.4 MB in bf16.
FIXTURE_MODEL = dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                     intermediate_size=256, moe_intermediate_size=256, num_hidden_layers=2, vocab_size=512)
HELDOUT_FRACTION = 0.1  # of a text file's characters (the built-in corpus has its own split)
RECORD_FILE = "training.json"


@dataclass
class TrainConfig:
    steps: int = 600
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 3e-3
    min_lr: float = 3e-4  # the cosine schedule ends here
    warmup: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    balance_weight: float = 0.01  # Switch-Transformer load-balancing loss
    seed: int = 0


@dataclass
class TrainResult:
    config: dict
    train: dict
    train_tokens: int
    heldout_tokens: int
    losses: list[float]
    heldout_ppl: float
    unigram_ppl: float
    expert_share: list[list[float]]  # per layer, per expert: share of top-k assignments on held-out text
    seconds: float
    threads: int = field(default_factory=torch.get_num_threads)


def model_config(preset: str | None = None, **overrides) -> GrokConfig:
    """The fixture's shapes (or a synth preset's) with overrides; embedding scale sqrt(hidden) as in Grok 2."""
    base = dict(PRESETS.get(preset, {})) if preset else dict(FIXTURE_MODEL)  # synth_config rejects unknown presets
    base.update({k: v for k, v in overrides.items() if v is not None})
    base.setdefault("embedding_multiplier_scale", math.sqrt(base["hidden_size"]))
    return synth_config(preset or "tiny", **base)


# ---- text ----------------------------------------------------------------------------------------

def training_documents(source: str | Path) -> tuple[list[str], list[str]]:
    """(train, held-out) documents: the built-in corpus's split, or a text file whose last 10% is held out."""
    if str(source) == "builtin":
        return split_documents("train"), split_documents("heldout")
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GrokquantError(f"{path}: no such training text (or use `builtin`)") from None
    except (IsADirectoryError, UnicodeDecodeError):
        raise GrokquantError(f"{path}: not a UTF-8 text file") from None
    cut = int(len(text) * (1 - HELDOUT_FRACTION))
    return [text[:cut]], [text[cut:]]


def tokenizer_json(text: str, vocab_size: int) -> str:
    """A BPE trained on `text`, with the special-token ids synthetic checkpoints use."""
    n = len(SPECIALS)
    ids = {s: i for i, s in enumerate(SPECIALS[:4])}
    ids.update({s: vocab_size - (n - i) for i, s in enumerate(SPECIALS) if i >= 4})
    return json.dumps(train_bpe(text[:TOKENIZER_TEXT_CHARS], vocab_size, SPECIALS, ids))


def unigram_ppl(train_ids: torch.Tensor, heldout_ids: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of add-one-smoothed training-set token frequencies on held-out tokens: the bar to clear."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[heldout_ids[1:]].mean().item())


# ---- model ---------------------------------------------------------------------------------------

def init_model(cfg: GrokConfig, seed: int) -> Grok2ForCausalLM:
    """A trainable model: matrices N(0, 1/fan_in) (embedding 1/hidden, so that times the embedding
    scale sqrt(hidden) it is O(1)), norms 1; small enough that bf16 rounding never matters."""
    torch.manual_seed(seed)
    model = Grok2ForCausalLM(cfg, "sglang")
    for name, p in model.named_parameters():
        if p.dim() == 1:
            torch.nn.init.ones_(p)
        elif name == "model.embed_tokens.weight":
            torch.nn.init.normal_(p, std=cfg.hidden_size ** -0.5)
        else:
            torch.nn.init.normal_(p, std=p.shape[1] ** -0.5)
        p.requires_grad_(True)
    return model


class RouterStats:
    """Collects each MoE layer's router probabilities and top-k choices during a forward pass."""

    def __init__(self, model: Grok2ForCausalLM):
        self.cfg = model.cfg
        self.probs: list[torch.Tensor] = []
        self.choices: list[torch.Tensor] = []
        self.hooks = [layer.block_sparse_moe.register_forward_pre_hook(self._hook) for layer in model.model.layers]

    def _hook(self, moe, args):
        x = args[0].reshape(-1, args[0].shape[-1])
        logits = softcap(F.linear(x.float(), moe.gate.weight.float()), self.cfg.router_logit_softcapping)
        probs = torch.softmax(logits, dim=-1)
        self.probs.append(probs)
        self.choices.append(probs.topk(self.cfg.num_experts_per_tok, dim=-1).indices)

    def balance_loss(self) -> torch.Tensor:
        """E * sum_e (share of assignments to e) * (mean router probability of e), averaged over layers;
        1 when perfectly balanced."""
        E = self.cfg.num_local_experts
        losses = []
        for probs, choices in zip(self.probs, self.choices):
            share = torch.bincount(choices.flatten(), minlength=E).float() / choices.numel()
            losses.append(E * (share * probs.mean(0)).sum())
        return torch.stack(losses).mean()

    def clear(self) -> None:
        self.probs, self.choices = [], []

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def forward(model: Grok2ForCausalLM, tokens: torch.Tensor, rope) -> torch.Tensor:
    """Logits [B, T, vocab] with gradients (the model's own `forward` is inference-only)."""
    positions = torch.arange(tokens.shape[1])
    h = model.embed(tokens)
    for layer in range(model.cfg.num_hidden_layers):
        h = model.run_layer(layer, h, positions, None, rope)
    return model.head(h)


def lr_at(step: int, tc: TrainConfig) -> float:
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    progress = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def evaluate_heldout(model: Grok2ForCausalLM, ids: torch.Tensor, seq_len: int) -> tuple[float, list[list[float]]]:
    """(perplexity over non-overlapping windows, share of top-k assignments per layer and expert)."""
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise GrokquantError(f"held-out text has {len(ids)} tokens, fewer than one window of {seq_len}")
    x = ids[: n * seq_len].view(n, seq_len)
    y = ids[1: n * seq_len + 1].view(n, seq_len)
    rope = rope_cos_sin(torch.arange(seq_len), model.cfg, model.sem)
    stats = RouterStats(model)
    nll, count = 0.0, 0
    try:
        for i in range(0, n, 8):
            logits = forward(model, x[i:i + 8], rope)
            nll += F.cross_entropy(logits.flatten(0, 1), y[i:i + 8].flatten(), reduction="sum").item()
            count += y[i:i + 8].numel()
    finally:
        stats.remove()
    E, L = model.cfg.num_local_experts, model.cfg.num_hidden_layers
    share = []
    for layer in range(L):
        picks = torch.cat([c.flatten() for c in stats.choices[layer::L]])
        share.append((torch.bincount(picks, minlength=E).double() / picks.numel()).tolist())
    return math.exp(nll / count), share


# ---- training ------------------------------------------------------------------------------------

def train(out: str | Path, text: str | Path = "builtin", tc: TrainConfig | None = None, cfg: GrokConfig | None = None,
          layout: str = "tp8", force: bool = False, on_step: Callable[[int, float, float], None] | None = None,
          heldout_limit: int | None = None) -> TrainResult:
    """Train from scratch and write the checkpoint directory `out`; `on_step(step, loss, lr)` reports progress.

    The held-out perplexity is measured on the first `heldout_limit` held-out tokens (default: all).
    """
    tc = tc or TrainConfig()
    cfg = cfg or model_config()
    out = Path(out)
    if out.exists() and not force:
        raise GrokquantError(f"{out} exists (use --force to replace it)")
    if tc.steps < 1:
        raise GrokquantError("--steps must be at least 1")
    start = time.perf_counter()
    train_docs, heldout_docs = training_documents(text)
    tok_json = tokenizer_json("\n\n".join(train_docs), cfg.vocab_size)
    tok = tokenizer_from_dict(json.loads(tok_json), Path("tokenizer.tok.json"))
    train_ids, heldout_ids = document_tokens(tok, train_docs), document_tokens(tok, heldout_docs)
    if len(train_ids) <= tc.seq_len:
        raise GrokquantError(f"training text has {len(train_ids)} tokens, fewer than one window of {tc.seq_len}")

    model = init_model(cfg, tc.seed)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95), fused=True)
    gen = torch.Generator().manual_seed(tc.seed)
    rope = rope_cos_sin(torch.arange(tc.seq_len), cfg, model.sem)
    offsets = torch.arange(tc.seq_len + 1)
    router = RouterStats(model)
    losses = []
    try:
        for step in range(tc.steps):
            lr = lr_at(step, tc)
            for group in opt.param_groups:
                group["lr"] = lr
            starts = torch.randint(0, len(train_ids) - tc.seq_len - 1, (tc.batch_size,), generator=gen)
            batch = train_ids[starts[:, None] + offsets]
            router.clear()
            logits = forward(model, batch[:, :-1], rope)
            loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            (loss + tc.balance_weight * router.balance_loss()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(round(loss.item(), 4))
            if on_step:
                on_step(step, losses[-1], lr)
    finally:
        router.remove()

    # evaluate the weights as saved: rounded to bf16
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    heldout_ppl, share = evaluate_heldout(model, heldout_ids[:heldout_limit], tc.seq_len)
    result = TrainResult(config=cfg.to_dict(), train=asdict(tc) | {"text": str(text)}, train_tokens=len(train_ids),
                         heldout_tokens=len(heldout_ids), losses=losses, heldout_ppl=heldout_ppl,
                         unigram_ppl=unigram_ppl(train_ids, heldout_ids, cfg.vocab_size), expert_share=share,
                         seconds=round(time.perf_counter() - start, 1))
    state = {n: p.detach().bfloat16() for n, p in model.state_dict().items()}
    write_checkpoint(out, cfg, slices_of(state.__getitem__), tokenizer_json=tok_json, layout=layout, force=force)
    with replacing(out / RECORD_FILE) as tmp:
        tmp.write_text(json.dumps(asdict(result), indent=1) + "\n")
    return result
