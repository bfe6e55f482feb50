"""Quality of artifacts: perplexity, and KL divergence / top-1 agreement / Δp against a baseline.

An artifact is an original checkpoint directory, a GPTQ directory (from `grokquant quantize`) or a GGUF
file. GGUF files run in our model (`torch` engine, computing as llama.cpp's CPU backend does) or in
llama.cpp itself (`llama.cpp` engine, llama-cpp-python in a child process so a bad file cannot abort).

Windows follow llama-perplexity: the text's tokens are cut into windows of `ctx` tokens starting every
`stride` tokens (default `ctx`: non-overlapping chunks), and each window scores only its last
`min(stride, ctx - ctx//2 - 1)` tokens, so that every scored token has seen at least half a window of
context. With the default stride this is exactly llama-perplexity's choice (the logits of positions
ctx/2 .. ctx-2 predicting tokens ctx/2+1 .. ctx-1); with a smaller stride the scored tails tile the
text without gaps. No BOS is inserted (Grok 2's tokenizer has none).

The statistics are llama-perplexity's `--kl-divergence` ones, with the same formulas for the standard
errors and percentiles. Baseline log-probabilities are kept top-k compressed: per scored token the k
most likely ids and their log-probabilities, the log of the remaining probability mass, and the
target's log-probability. KL divergence is then computed between the two distributions coarsened to
{top-k ids, everything else}: a lower bound of the full KL divergence (data processing inequality),
exact when k covers the vocabulary; on the trained fixture k = 64 gives 96% of the exact value,
k = 256 (the default) 99.9%. A baseline is computed once per forward-pass semantics that the artifacts use (a GGUF is
compared with the original model computed in llama.cpp semantics, so that only quantization differs),
and can be saved and reused.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from grokquant.data.corpus import builtin_text, split_documents
from grokquant.errors import GrokquantError

DEFAULT_TOP_K = 256  # 2 KB per scored token and semantics
WHOLE_MODEL_BYTES = 2 << 30  # float32 weights up to this size are loaded at once, larger ones streamed
TOKENIZER_PROBE_CHARS = 2000
KINDS = ("checkpoint", "gptq", "gguf")
ENGINES = ("torch", "llama.cpp")


# ---- text and windows ----------------------------------------------------------------------------

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


# ---- artifacts -------------------------------------------------------------------------------------

@dataclass
class Artifact:
    path: Path
    kind: str  # checkpoint, gptq or gguf
    engine: str = "torch"  # torch or llama.cpp (GGUF only)
    semantics: str = "sglang"

    @property
    def label(self) -> str:
        return self.path.name + (" [llama.cpp]" if self.engine == "llama.cpp" else "")

    def files(self) -> list[Path]:
        if self.kind == "gguf":
            from grokquant.gguf.weights import GGUFWeights

            source = GGUFWeights(self.path)
            try:
                return [f.path for f in source.files]
            finally:
                source.close()
        return sorted(self.path.glob("*.safetensors"))

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files())

    def source(self):
        """A weight source (`.config`, `.tensor(name)`) for our model."""
        if self.kind == "gguf":
            from grokquant.gguf.weights import GGUFWeights

            return GGUFWeights(self.path)
        if self.kind == "gptq":
            from grokquant.gptq.weights import GPTQWeights

            return GPTQWeights(self.path)
        from grokquant.grok.checkpoint import Checkpoint

        return Checkpoint.open(self.path)

    def tokenizer(self):
        if self.kind == "gguf":
            from grokquant.gguf.vocab import tokenizer_from_gguf
            from grokquant.gguf.file import read_gguf

            f = read_gguf(self.path)
            try:
                return tokenizer_from_gguf(f.metadata)
            finally:
                f.close()
        from grokquant.grok.tokenizer import load_tokenizer

        return load_tokenizer(self.path / "tokenizer.tok.json")


def open_artifact(path: str | Path, engine: str = "torch", semantics: str | None = None) -> Artifact:
    """Recognise what `path` is; `semantics` overrides the torch engine's default (sglang for
    checkpoints and GPTQ, the file's own llama.cpp semantics for GGUF)."""
    from grokquant.runtime.load import open_source

    if engine not in ENGINES:
        raise GrokquantError(f"unknown engine {engine!r} (torch or llama.cpp)")
    source = open_source(path)
    source.close()
    if engine == "llama.cpp":
        if source.kind != "gguf":
            raise GrokquantError(f"{path}: the llama.cpp engine runs GGUF files only")
        return Artifact(Path(path), "gguf", engine, source.semantics)
    return Artifact(Path(path), source.kind, engine, semantics or source.semantics)


# ---- logits ----------------------------------------------------------------------------------------

def scored_logits(art: Artifact, windows: Windows, batch_size: int = 8) -> Iterator[torch.Tensor]:
    """Float32 logits [b, n_score, vocab] of the scored positions, a few windows at a time, in order."""
    if art.engine == "llama.cpp":
        yield from _llamacpp_logits(art.path, windows)
    else:
        yield from _torch_logits(art, windows, batch_size)


@torch.no_grad()
def _torch_logits(art: Artifact, windows: Windows, batch_size: int) -> Iterator[torch.Tensor]:
    from grokquant.grok.model import Grok2ForCausalLM

    source = art.source()
    try:
        cfg = source.config
        n_params = sum(math.prod(s) for s in cfg.all_shapes().values())
        if art.kind == "gguf":  # ggml's activation rounding hooks need the whole model
            if 4 * n_params > WHOLE_MODEL_BYTES:
                raise GrokquantError(f"{art.path}: too large for the torch engine; use --engine llama.cpp")
            model = source.model(art.semantics)
        elif 4 * n_params <= WHOLE_MODEL_BYTES:
            model = Grok2ForCausalLM.from_checkpoint(source, art.semantics)
        else:
            yield from _streamed_logits(source, art.semantics, windows, batch_size)
            return
        span = windows.logit_span
        for i in range(0, len(windows.tokens), batch_size):
            yield model(windows.tokens[i:i + batch_size])[:, span]
    finally:
        close = getattr(source, "close", None)
        if close:
            close()


def _streamed_logits(source, semantics: str, windows: Windows, batch_size: int) -> Iterator[torch.Tensor]:
    """One decoder layer's dense part or one expert in memory at a time; the hidden states of every window
    wait between layers."""
    from grokquant.grok.model import Grok2ForCausalLM
    from grokquant.grok.streaming import LayerStreamer

    cfg = source.config
    streamer = LayerStreamer(Grok2ForCausalLM.empty(cfg, semantics), source.tensor, windows.ctx)
    hidden = streamer.embed(windows.tokens, batch_size)
    for layer in range(cfg.num_hidden_layers):
        hidden = streamer.run(layer, hidden)
    for h in hidden:
        yield streamer.head(h[:, windows.logit_span])


def _llamacpp_logits(path: Path, windows: Windows) -> Iterator[torch.Tensor]:
    if importlib.util.find_spec("llama_cpp") is None:
        raise GrokquantError("the llama.cpp engine needs llama-cpp-python (pip install 'grokquant[llama]')")
    with tempfile.TemporaryDirectory() as tmp:
        tokens_file, log_file = Path(tmp) / "tokens.npy", Path(tmp) / "stderr.txt"
        np.save(tokens_file, windows.tokens.numpy().astype(np.int32))
        cmd = [sys.executable, "-m", "grokquant.evaluate.evaluate", str(path), str(tokens_file), str(windows.n_score),
               str(torch.get_num_threads())]
        with open(log_file, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log)
            try:
                header = proc.stdout.read(4)
                n_vocab = int(np.frombuffer(header, np.int32)[0]) if len(header) == 4 else 0
                size = windows.n_score * n_vocab * 4
                for _ in range(len(windows.tokens)):
                    data = proc.stdout.read(size) if n_vocab else b""
                    if len(data) != size or not n_vocab:
                        break
                    yield torch.from_numpy(np.frombuffer(data, np.float32).copy()).view(1, windows.n_score, n_vocab)
                else:
                    proc.stdout.close()
                    if proc.wait() == 0:
                        return
            finally:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
        tail = log_file.read_text(errors="replace").strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        raise GrokquantError(f"{path}: llama.cpp failed: {tail[0]}")


def _llama_worker(path: str, tokens_file: str, n_score: str, threads: str) -> None:
    """Child process: evaluate each window from an empty cache, write the scored logits to stdout."""
    from grokquant.runtime.llama_engine import EXACT, open_llama

    tokens = np.load(tokens_file)
    n, ctx = tokens.shape
    n_score = int(n_score)
    llm = open_llama(path, n_ctx=ctx, n_batch=ctx, logits_all=True, verbose=False, n_threads=int(threads), **EXACT)
    out = sys.stdout.buffer
    out.write(np.int32(llm.n_vocab()).tobytes())
    for window in tokens:
        llm.reset()
        llm.eval(window.tolist())
        out.write(np.ascontiguousarray(llm.scores[ctx - n_score - 1: ctx - 1], dtype=np.float32).tobytes())
        out.flush()


# ---- scoring ---------------------------------------------------------------------------------------

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


def _log_rest(logp: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside `ids`, computed without cancellation."""
    if ids.shape[1] >= logp.shape[1]:
        return torch.full(logp.shape[:1], -math.inf, dtype=logp.dtype)
    return logp.scatter(1, ids, -math.inf).logsumexp(1)


def score_pass(logits: Iterator[torch.Tensor], windows: Windows, base: BaselineLogits | None = None,
               compress_k: int | None = None) -> TokenScores:
    """Per-token statistics of one artifact; with `compress_k`, also its top-k compressed log-probs."""
    targets = windows.targets().reshape(-1)
    scores = TokenScores()
    at = 0
    for window in (w for chunk in logits for w in chunk):  # one window at a time: [n_score, vocab] in float64
        logp = torch.log_softmax(window.double(), dim=-1)
        n = logp.shape[0]
        tgt = targets[at:at + n]
        target_logp = logp.gather(1, tgt[:, None])[:, 0]
        scores.nll.append(-target_logp)
        if compress_k:
            top_logp, top_ids = logp.topk(min(compress_k, logp.shape[1]), dim=1)
            scores.compressed.append((top_ids, top_logp.float(), _log_rest(logp, top_ids).float(), target_logp.float()))
        if base is not None:
            ids = base.top_ids[at:at + n]
            p_logp = base.top_logp[at:at + n].double()
            q_logp = logp.gather(1, ids)
            kld = (p_logp.exp() * (p_logp - q_logp)).sum(1)
            p_rest = base.rest_logp[at:at + n].double()
            rest = p_rest.exp() * (p_rest - _log_rest(logp, ids))
            scores.kld.append(kld + torch.where(torch.isinf(p_rest), torch.zeros_like(rest), rest))
            scores.dp.append(target_logp.exp() - base.target_logp[at:at + n].double().exp())
            scores.same_top.append(logp.argmax(1) == ids[:, 0])
        at += n
    if at != len(targets):
        raise GrokquantError(f"got logits for {at} of {len(targets)} scored tokens")
    return scores


# ---- statistics (llama-perplexity's formulas) ------------------------------------------------------

def mean_and_se(x: torch.Tensor) -> tuple[float, float]:
    x = x.double()
    n = x.numel()
    mean = x.mean().item()
    var = (x.pow(2).mean() - x.mean() ** 2).item()
    return mean, math.sqrt(var / (n - 1)) if var > 0 and n > 1 else 0.0


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
    top1 = same.mean().item()
    out["top1"], out["top1_se"] = top1, math.sqrt(top1 * (1 - top1) / max(1, len(same) - 1))
    out["dp"], out["dp_se"] = mean_and_se(dp)
    out["dp_rms"] = math.sqrt(dp.pow(2).mean().item())
    if base_nll is not None:  # paired over tokens: the same as llama-perplexity's covariance formula
        out["ppl_base"] = math.exp(base_nll.double().mean().item())
        out["ln_ppl_ratio"], out["ln_ppl_ratio_se"] = mean_and_se(nll - base_nll.double())
    return out


# ---- baseline --------------------------------------------------------------------------------------

@dataclass
class Baseline:
    """The baseline's compressed log-probabilities per semantics, on fixed windows."""
    windows: Windows
    top_k: int
    label: str
    logits: dict[str, BaselineLogits] = field(default_factory=dict)
    artifact: Artifact | None = None  # to compute semantics not yet present
    scores: dict[str, TokenScores] = field(default_factory=dict)  # the baseline artifact's own, per semantics

    def for_semantics(self, semantics: str, batch_size: int = 8) -> BaselineLogits:
        """The baseline under `semantics`, computed (always by the torch engine) on first use."""
        if semantics not in self.logits:
            if self.artifact is None:
                raise GrokquantError(f"the saved baseline holds {', '.join(self.logits)} logits, not {semantics}; "
                                     f"evaluate against the baseline artifact itself, or pass --semantics")
            art = Artifact(self.artifact.path, self.artifact.kind, "torch", semantics)
            scores = score_pass(scored_logits(art, self.windows, batch_size), self.windows, compress_k=self.top_k)
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
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            save_file(tensors, str(tmp), metadata={"grokquant_baseline": json.dumps(meta)})
            tmp.rename(path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Baseline":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads((f.metadata() or {})["grokquant_baseline"])
                t = {k: f.get_tensor(k) for k in f.keys()}
        except (KeyError, OSError, ValueError, SafetensorError):
            raise GrokquantError(f"{path}: not a baseline file written by `grokquant eval --save-baseline`") from None
        windows = Windows(t["tokens"].long(), meta["stride"], meta["n_score"])
        logits = {sem: BaselineLogits(t[f"{sem}/top_ids"].long(), t[f"{sem}/top_logp"], t[f"{sem}/rest_logp"],
                                      t[f"{sem}/target_logp"]) for sem in meta["semantics"]}
        return cls(windows, meta["top_k"], meta["label"], logits)


def is_baseline_file(path: str | Path) -> bool:
    return Path(path).is_file() and Path(path).suffix == ".safetensors"


# ---- the whole evaluation --------------------------------------------------------------------------

def evaluate(artifacts: list[Artifact], windows: Windows, baseline: Baseline | None = None, batch_size: int = 8,
             on_artifact=None) -> list[dict]:
    """One result dict per artifact (in order): size, perplexity, and statistics against the baseline."""
    from grokquant.runtime.sizes import param_counts

    results = []
    for art in artifacts:
        base = baseline.for_semantics(art.semantics, batch_size) if baseline else None
        scores = baseline.own_scores(art) if baseline else None
        if scores is None:
            scores = score_pass(scored_logits(art, windows, batch_size), windows, base)
        size = art.size_bytes()
        source = art.source()
        try:
            n_params = param_counts(source.config.all_shapes(), source.config)["total"]
        finally:
            getattr(source, "close", lambda: None)()
        row = {"artifact": art.label, "path": str(art.path), "kind": art.kind, "engine": art.engine,
               "semantics": art.semantics, "size_bytes": size, "bits_per_weight": 8 * size / n_params}
        row.update(summarize(scores, -base.target_logp if base is not None else None))
        row["kld_values"] = scores.cat("kld").clamp(min=0) if scores.kld else None
        results.append(row)
        if on_artifact:
            on_artifact(row)
    return results


def run_eval(paths: list[str | Path], data: str | Path = "builtin", ctx: int = 512, stride: int | None = None,
             chunks: int | None = None, baseline: str | Path | None = None, save_baseline: str | Path | None = None,
             top_k: int = DEFAULT_TOP_K, engine: str = "torch", semantics: str | None = None, batch_size: int = 8,
             on_artifact=None) -> tuple[list[dict], str | None]:
    """`grokquant eval`: open everything, make the windows, evaluate; returns (results, baseline label).

    `engine` applies to GGUF files (`both`: a row for each engine); `baseline` is an artifact or a file
    saved by `save_baseline`, which holds the baseline under sglang and llama.cpp semantics (and any other
    the artifacts use).
    """
    if top_k < 1:
        raise GrokquantError("--top-k must be at least 1")
    if save_baseline and (baseline is None or is_baseline_file(baseline)):
        raise GrokquantError("--save-baseline needs --baseline ARTIFACT (a checkpoint, GPTQ directory or GGUF file)")
    artifacts = []
    for p in paths:
        is_gguf = Path(p).suffix == ".gguf"
        engines = ENGINES if engine == "both" and is_gguf else [engine if is_gguf and engine != "both" else "torch"]
        artifacts += [open_artifact(p, e, semantics) for e in engines]
    saved = Baseline.load(baseline) if baseline and is_baseline_file(baseline) else None
    base_art = open_artifact(baseline, "torch", semantics) if baseline and not saved else None
    first = base_art or (artifacts[0] if artifacts else None)
    if first is None:
        raise GrokquantError("nothing to evaluate: give ARTIFACTs or --baseline with --save-baseline")
    tok = first.tokenizer()
    check_same_tokenizer(artifacts + ([base_art] if base_art else []), tok, sample_text(data))
    windows = make_windows(evaluation_tokens(tok, data), ctx, stride, chunks)
    if saved:
        if not torch.equal(saved.windows.tokens, windows.tokens) or saved.windows.n_score != windows.n_score:
            w = saved.windows
            raise GrokquantError(f"{baseline}: its logits are for other windows ({len(w.tokens)} of ctx {w.ctx}, "
                                 f"stride {w.stride}); use the same --data, --ctx, --stride and --chunks")
        base = saved
    elif base_art:
        base = Baseline(windows, top_k, base_art.label, artifact=base_art)
    else:
        base = None
    results = evaluate(artifacts, windows, base, batch_size, on_artifact)
    if save_baseline:
        wanted = {"sglang", "llama.cpp"} if semantics is None else {semantics}
        for sem in sorted(wanted | {a.semantics for a in artifacts}):
            base.for_semantics(sem, batch_size)
        base.save(save_baseline)
    return results, base.label if base else None


def check_same_tokenizer(artifacts: list[Artifact], tok, sample: str) -> None:
    """Every artifact must tokenize like the one the windows were made with."""
    expected = tok.encode(sample, allow_special=False)
    for art in artifacts:
        if art.tokenizer().encode(sample, allow_special=False) != expected:
            raise GrokquantError(f"{art.path}: tokenizes differently from the baseline; KLD needs the same tokens")


def sample_text(data: str | Path) -> str:
    if str(data) == "builtin":
        return builtin_text("heldout", TOKENIZER_PROBE_CHARS)
    from grokquant.data.documents import load_documents

    return "\n\n".join(load_documents(data))[:TOKENIZER_PROBE_CHARS]


# ---- output ----------------------------------------------------------------------------------------

def render(results: list[dict], baseline_label: str | None = None) -> str:
    has_base = any("kld" in r for r in results)
    head = f"{'artifact':<32}{'MB':>8}{'bpw':>7}{'PPL':>18}"
    if has_base:
        head += f"{'mean KLD':>11}{'KLD 99%':>10}{'KLD 99.9%':>11}{'top-1 %':>9}{'Δp %':>8}"
    lines = [head]
    for r in results:
        line = (f"{r['artifact'][:31]:<32}{r['size_bytes'] / 1e6:>8.2f}{r['bits_per_weight']:>7.2f}"
                f"{r['ppl']:>10.3f} ± {r['ppl_se']:<5.3f}")
        if "kld" in r:
            line += (f"{r['kld']:>11.5f}{r['kld_p99']:>10.4f}{r['kld_p999']:>11.4f}{100 * r['top1']:>9.2f}"
                     f"{100 * r['dp']:>8.3f}")
        lines.append(line)
    n = results[0]["tokens"] if results else 0
    lines.append(f"{n} scored tokens" + (f"; KLD, top-1 and Δp against {baseline_label}" if has_base else ""))
    base_ppl = {r["semantics"]: r["ppl_base"] for r in results if "ppl_base" in r}
    if base_ppl:  # each artifact is compared with the baseline computed in its own semantics
        lines.append(f"{baseline_label} PPL: " + ", ".join(f"{v:.3f} ({k} semantics)" for k, v in base_ppl.items()))
    return "\n".join(lines)


def to_json(results: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "kld_values"} for r in results]


def require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise GrokquantError("--plot needs matplotlib (pip install 'grokquant[plot]')")


def plot(results: list[dict], path: str | Path) -> Path:
    """Perplexity against size, and the distribution of per-token KL divergence."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        ax1.errorbar(r["size_bytes"] / 1e6, r["ppl"], yerr=r["ppl_se"], fmt="o")
        ax1.annotate(r["artifact"], (r["size_bytes"] / 1e6, r["ppl"]), fontsize=7, xytext=(4, 4),
                     textcoords="offset points")
        values = r.get("kld_values")
        if values is not None and values.numel() and values.max() > 0:
            v = values.clamp(min=1e-8).sort().values.numpy()
            ax2.plot(v, 1 - np.arange(len(v)) / len(v), label=r["artifact"])
    ax1.set(xlabel="size (MB)", ylabel="perplexity", title="perplexity vs size")
    ax1.margins(x=0.25)
    ax2.set(xscale="log", yscale="log", xlabel="per-token KL divergence", ylabel="fraction of tokens ≥ x",
            title="KL divergence from the baseline")
    if ax2.lines:
        ax2.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        fig.savefig(tmp, dpi=120)
        tmp.rename(path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


if __name__ == "__main__":  # the llama.cpp child process
    _llama_worker(*sys.argv[1:])
