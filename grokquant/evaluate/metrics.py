"""Per-token scores of an artifact against a baseline, and their summary statistics.

The statistics are llama-perplexity's `--kl-divergence` ones, with the same formulas for the standard
errors and percentiles. Baseline log-probabilities are kept top-k compressed: per scored token the k
most likely ids and their log-probabilities, the log of the remaining probability mass, and the
target's log-probability. KL divergence is then computed between the two distributions coarsened to
{top-k ids, everything else}: a lower bound of the full KL divergence (data processing inequality),
exact when k covers the vocabulary; on the trained fixture k = 64 gives 96% of the exact value,
k = 256 (the default) 99.9%. A baseline is computed once per forward-pass semantics that the artifacts
use (a GGUF is compared with the original model computed in llama.cpp semantics, so that only
quantization differs), and can be saved and reused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from grokquant.errors import GrokquantError
from grokquant.evaluate.engines import Artifact, scored_logits
from grokquant.evaluate.resume import COMPRESSED, SCORES, EvalWork
from grokquant.evaluate.windows import Windows
from grokquant.io.paths import replacing
from grokquant.quant.sums import stack_sum

DEFAULT_TOP_K = 256  # 2 KB per scored token and semantics


@dataclass
class BaselineLogits:
    """Top-k compressed log-probabilities of the baseline at every scored token (flattened windows)."""
    top_ids: torch.Tensor  # [N, k] int64, most likely first
    top_logp: torch.Tensor  # [N, k] float32
    rest_logp: torch.Tensor  # [N] float32: log of the probability outside the top k (-inf if none)
    target_logp: torch.Tensor  # [N] float32


@dataclass
class TokenScores:
    nll: list[torch.Tensor] = field(default_factory=list)
    kld: list[torch.Tensor] = field(default_factory=list)
    dp: list[torch.Tensor] = field(default_factory=list)  # p(target) - p_base(target)
    same_top: list[torch.Tensor] = field(default_factory=list)
    compressed: list[tuple] = field(default_factory=list)

    def cat(self, name: str) -> torch.Tensor:
        return torch.cat(getattr(self, name))

    def baseline(self) -> BaselineLogits:
        parts = list(zip(*self.compressed))
        return BaselineLogits(*(torch.cat(p) for p in parts))


# ---- the scoring pass ------------------------------------------------------------------------------

def _log_rest(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside `ids`, computed without cancellation."""
    if ids.shape[1] >= logp.shape[1]:
        return torch.full(logp.shape[:1], -math.inf, dtype=logp.dtype)
    return logp.scatter(1, ids, -math.inf).logsumexp(1)


def score_pass(logits: Iterator[torch.Tensor], windows: Windows, base: BaselineLogits | None = None,
               compress_k: int | None = None, start: int = 0, scores: TokenScores | None = None,
               on_chunk: Callable[[TokenScores, int], None] | None = None) -> TokenScores:
    """Per-token statistics of one artifact; with `compress_k`, also its top-k compressed log-probs.

    `logits` are those of the windows from `start` on, appended to `scores` (a resumed pass's);
    on_chunk(scores, windows done) follows each chunk of logits."""
    targets = windows.targets()[start:].reshape(-1)
    scores = scores or TokenScores()
    at, offset, done = 0, start * windows.n_score, start
    for chunk in logits:
        for window in chunk:  # one window at a time: [n_score, vocab] in float64
            logp = torch.log_softmax(window.double(), dim=-1)
            n = logp.shape[0]
            tgt = targets[at:at + n]
            target_logp = logp.gather(1, tgt[:, None])[:, 0]
            scores.nll.append(-target_logp)
            if compress_k:
                top_logp, top_ids = logp.topk(min(compress_k, logp.shape[1]), dim=1)
                scores.compressed.append((top_ids, top_logp.float(), _log_rest(logp, top_ids).float(),
                                          target_logp.float()))
            if base is not None:
                b = slice(offset + at, offset + at + n)
                ids = base.top_ids[b]
                p_logp = base.top_logp[b].double()
                q_logp = logp.gather(1, ids)
                kld = (p_logp.exp() * (p_logp - q_logp)).sum(1)
                p_rest = base.rest_logp[b].double()
                rest = p_rest.exp() * (p_rest - _log_rest(logp, ids))
                scores.kld.append(kld + torch.where(torch.isinf(p_rest), torch.zeros_like(rest), rest))
                scores.dp.append(target_logp.exp() - base.target_logp[b].double().exp())
                scores.same_top.append(logp.argmax(1) == ids[:, 0])
            at += n
        done += len(chunk)
        if on_chunk:
            on_chunk(scores, done)
    if at != len(targets):
        raise GrokquantError(f"got logits for {at} of {len(targets)} scored tokens")
    return scores


def scored_pass(art: Artifact, windows: Windows, batch_size: int = 8, base: BaselineLogits | None = None,
                compress_k: int | None = None, work: EvalWork | None = None) -> TokenScores:
    """score_pass over the artifact's logits; with `work`, what an interrupted run finished is reused and
    the new windows' scores are saved as they come (evaluate/resume.py)."""
    if work is None:
        return score_pass(scored_logits(art, windows, batch_size), windows, base, compress_k)
    job = work.next_pass(f"{art.path.resolve()} {art.engine} {art.semantics} top-{compress_k or 0}")
    scores = TokenScores()
    for saved in job.saved_scores():
        _append(scores, saved)
    if job.entry["complete"]:
        return scores
    start = job.windows_done
    kept = {name: len(getattr(scores, name)) for name in (*SCORES, "compressed")}

    def save(scores: TokenScores, done: int, complete: bool = False) -> None:
        if complete or (work.due() and not job.streaming):
            job.save_scores(_tensors(scores, kept), done, complete)
            kept.update({name: len(getattr(scores, name)) for name in kept})

    rest = Windows(windows.tokens[start:], windows.stride, windows.n_score)
    scores = score_pass(scored_logits(art, rest, batch_size, job), windows, base, compress_k, start, scores, save)
    save(scores, len(windows.tokens), complete=True)
    return scores


def _tensors(scores: TokenScores, kept: dict[str, int]) -> dict[str, torch.Tensor]:
    """The scores appended since `kept` (entries per list), as flat tensors."""
    out = {name: torch.cat(getattr(scores, name)[kept[name]:]) for name in SCORES
           if len(getattr(scores, name)) > kept[name]}
    new = scores.compressed[kept["compressed"]:]
    if new:
        out.update({name: torch.cat(part) for name, part in zip(COMPRESSED, zip(*new))})
    return out


def _append(scores: TokenScores, saved: dict[str, torch.Tensor]) -> None:
    for name in SCORES:
        if name in saved:
            getattr(scores, name).append(saved[name])
    if COMPRESSED[0] in saved:
        scores.compressed.append(tuple(saved[name] for name in COMPRESSED))


# ---- statistics (llama-perplexity's formulas) ------------------------------------------------------

def mean(x: torch.Tensor) -> float:
    """In float64, in an order that does not depend on the thread count (quant/sums.py)."""
    return float(stack_sum(x.double().reshape(1, -1))[0]) / max(1, x.numel())


def mean_and_se(x: torch.Tensor) -> tuple[float, float]:
    x = x.double()
    n = x.numel()
    m = mean(x)
    var = mean(x.pow(2)) - m ** 2
    return m, math.sqrt(var / (n - 1)) if var > 0 and n > 1 else 0.0


def percentile(sorted_values: torch.Tensor, fraction: float) -> float:
    """Linear interpolation between order statistics, as llama-perplexity."""
    p = fraction * (len(sorted_values) - 1)
    i = int(p)
    j = min(i + 1, len(sorted_values) - 1)
    return ((1 - (p - i)) * sorted_values[i] + (p - i) * sorted_values[j]).item()


def summarize(scores: TokenScores, base_nll: torch.Tensor | None = None) -> dict:
    nll = scores.cat("nll")
    mean_nll, se_nll = mean_and_se(nll)
    ppl = math.exp(mean_nll)
    out = {"tokens": nll.numel(), "ppl": ppl, "ppl_se": ppl * se_nll}
    if not scores.kld:
        return out
    kld = scores.cat("kld").clamp(min=0)  # float rounding can leave -1e-17
    kld_sorted = kld.sort().values
    dp = scores.cat("dp")
    same = scores.cat("same_top").double()
    out["kld"], out["kld_se"] = mean_and_se(kld)
    out.update(kld_median=percentile(kld_sorted, 0.5), kld_p99=percentile(kld_sorted, 0.99),
               kld_p999=percentile(kld_sorted, 0.999), kld_max=kld_sorted[-1].item())
    top1 = mean(same)
    out["top1"], out["top1_se"] = top1, math.sqrt(top1 * (1 - top1) / max(1, len(same) - 1))
    out["dp"], out["dp_se"] = mean_and_se(dp)
    out["dp_rms"] = math.sqrt(mean(dp.pow(2)))
    if base_nll is not None:  # paired over tokens: the same as llama-perplexity's covariance formula
        out["ppl_base"] = math.exp(mean(base_nll))
        out["ln_ppl_ratio"], out["ln_ppl_ratio_se"] = mean_and_se(nll - base_nll.double())
    return out


# ---- the baseline ----------------------------------------------------------------------------------

@dataclass
class Baseline:
    """The baseline's compressed log-probabilities per semantics, on fixed windows."""
    windows: Windows
    top_k: int
    label: str
    logits: dict[str, BaselineLogits] = field(default_factory=dict)
    artifact: Artifact | None = None  # to compute semantics not yet present
    scores: dict[str, TokenScores] = field(default_factory=dict)  # the baseline artifact's own, per semantics

    def for_semantics(self, semantics: str, batch_size: int = 8, work: EvalWork | None = None) -> BaselineLogits:
        """The baseline under `semantics`, computed (always by the torch engine) on first use."""
        if semantics not in self.logits:
            if self.artifact is None:
                raise GrokquantError(f"the saved baseline holds {', '.join(self.logits)} logits, not {semantics}; "
                                     f"evaluate against the baseline artifact itself, or pass --semantics")
            art = Artifact(self.artifact.path, self.artifact.kind, "torch", semantics)
            scores = scored_pass(art, self.windows, batch_size, compress_k=self.top_k, work=work)
            self.logits[semantics] = scores.baseline()
            scores.compressed = []  # kept once, in self.logits
            self.scores[semantics] = scores
        return self.logits[semantics]

    def own_scores(self, art: Artifact) -> TokenScores | None:
        """Scores already computed when `art` is the baseline artifact itself (same engine and semantics)."""
        me = self.artifact
        if me is None or art.engine != "torch" or art.path.resolve() != me.path.resolve():
            return None
        scores = self.scores.get(art.semantics)
        if scores is None:
            return None
        zeros = torch.zeros(sum(len(x) for x in scores.nll), dtype=torch.float64)  # against itself
        return TokenScores(nll=scores.nll, kld=[zeros], dp=[zeros], same_top=[torch.ones(len(zeros), dtype=torch.bool)])

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {"tokens": self.windows.tokens.to(torch.int32).contiguous()}
        for sem, b in self.logits.items():
            tensors.update({f"{sem}/top_ids": b.top_ids.to(torch.int32).contiguous(), f"{sem}/top_logp": b.top_logp,
                            f"{sem}/rest_logp": b.rest_logp, f"{sem}/target_logp": b.target_logp})
        meta = {"stride": self.windows.stride, "n_score": self.windows.n_score, "top_k": self.top_k,
                "label": self.label, "semantics": list(self.logits)}
        with replacing(path) as tmp:
            save_file(tensors, str(tmp), metadata={"grokquant_baseline": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Baseline":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {})["grokquant_baseline"])
                t = {k: f.get_tensor(k) for k in f.keys()}
        except (KeyError, OSError, ValueError, RecursionError, SafetensorError):
            raise GrokquantError(f"{path}: not a baseline file written by `grokquant eval --save-baseline`") from None
        windows = Windows(t["tokens"].long(), meta["stride"], meta["n_score"])
        logits = {sem: BaselineLogits(t[f"{sem}/top_ids"].long(), t[f"{sem}/top_logp"], t[f"{sem}/rest_logp"],
                                      t[f"{sem}/target_logp"]) for sem in meta["semantics"]}
        return cls(windows, meta["top_k"], meta["label"], logits)


def is_baseline_file(path: str | Path) -> bool:
    return Path(path).is_file() and Path(path).suffix == ".safetensors"
