"""`grokquant eval`: the quality of artifacts, as perplexity and as KL divergence / top-1 agreement / Δp
against a baseline.

The pieces: `windows` cuts the evaluation text into token windows, `engines` gives an artifact's
logits on them (our model, or llama.cpp for GGUF files), `metrics` scores those logits against the
baseline's and summarizes them as llama-perplexity does, and `report` shows the results.
"""

from __future__ import annotations

from pathlib import Path

import torch

from grokquant.errors import GrokquantError
from grokquant.evaluate.engines import ENGINES, Artifact, open_artifact
from grokquant.evaluate.metrics import DEFAULT_TOP_K, Baseline, is_baseline_file, scored_pass, summarize
from grokquant.evaluate.resume import EvalWork, fingerprint, resumable
from grokquant.evaluate.windows import Windows, evaluation_tokens, make_windows, sample_text


def evaluate(artifacts: list[Artifact], windows: Windows, baseline: Baseline | None = None, batch_size: int = 8,
             on_artifact=None, work: EvalWork | None = None) -> list[dict]:
    """One result dict per artifact (in order): size, perplexity, and statistics against the baseline;
    with `work`, resumable (evaluate/resume.py)."""
    from grokquant.runtime.sizes import param_counts

    results = []
    for art in artifacts:
        base = baseline.for_semantics(art.semantics, batch_size, work) if baseline else None
        scores = baseline.own_scores(art) if baseline else None
        if scores is None:
            scores = scored_pass(art, windows, batch_size, base, work=work)
        with art.open() as source:
            size = source.size_bytes()
            n_params = param_counts(source.config.all_shapes(), source.config)["total"]
        row = {"artifact": art.label, "path": str(art.path), "kind": art.kind, "engine": art.engine,
               "semantics": art.semantics, "size_bytes": size, "bits_per_weight": 8 * size / n_params}
        row.update(summarize(scores, -base.target_logp if base is not None else None))
        row["kld_values"] = scores.cat("kld").clamp(min=0) if scores.kld else None
        results.append(row)
        if on_artifact:
            on_artifact(row)
    return results


def artifacts_at(path: str | Path, engine: str, semantics: str | None) -> list[Artifact]:
    """The rows `path` gets: GGUF files run by `engine` (`both`: a row for each), the rest by torch."""
    art = open_artifact(path, "torch", semantics)
    if art.kind != "gguf" or engine == "torch":
        return [art]
    llama = open_artifact(path, "llama.cpp")
    return [art, llama] if engine == "both" else [llama]


def check_same_tokenizer(artifacts: list[Artifact], tok, sample: str) -> None:
    """Every artifact must tokenize like the one the windows were made with."""
    expected = tok.encode(sample, allow_special=False)
    for art in artifacts:
        if art.tokenizer().encode(sample, allow_special=False) != expected:
            raise GrokquantError(f"{art.path}: tokenizes differently from the baseline; KLD needs the same tokens")


def run_eval(paths: list[str | Path], data: str | Path = "builtin", ctx: int = 512, stride: int | None = None,
             chunks: int | None = None, baseline: str | Path | None = None, save_baseline: str | Path | None = None,
             top_k: int = DEFAULT_TOP_K, engine: str = "torch", semantics: str | None = None, batch_size: int = 8,
             on_artifact=None, force: bool = False, on_message=None) -> tuple[list[dict], str | None]:
    """`grokquant eval`: open everything, make the windows, evaluate; returns (results, baseline label).

    `engine` applies to GGUF files (`both`: a row for each engine); `baseline` is an artifact or a file
    saved by `save_baseline`, which holds the baseline under sglang and llama.cpp semantics (and any other
    the artifacts use).
    """
    if engine not in ENGINES + ("both",):
        raise GrokquantError(f"unknown engine {engine!r} (torch, llama.cpp or both)")
    if top_k < 1:
        raise GrokquantError("--top-k must be at least 1")
    for value, what in ((stride, "--stride"), (chunks, "--chunks"), (batch_size, "--batch-size"), (ctx, "--ctx")):
        if value is not None and value < 1:
            raise GrokquantError(f"{what} must be at least 1")
    if save_baseline and Path(save_baseline).exists() and not force:
        raise GrokquantError(f"{save_baseline} exists (use --force to overwrite)")
    if save_baseline and (baseline is None or is_baseline_file(baseline)):
        raise GrokquantError("--save-baseline needs --baseline ARTIFACT (a checkpoint, GPTQ directory or GGUF file)")
    artifacts = [art for p in paths for art in artifacts_at(p, engine, semantics)]
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
    options = dict(engine=engine, semantics=semantics, top_k=top_k, batch_size=batch_size, stride=windows.stride,
                   n_score=windows.n_score, artifacts=[(str(a.path.resolve()), a.engine, a.semantics) for a in artifacts],
                   baseline=str(Path(baseline).resolve()) if baseline else None, save_baseline=bool(save_baseline))
    inputs = [*paths, *([baseline] if baseline else [])]
    with resumable(fingerprint(options, inputs, windows.tokens), on_message) as work:
        results = evaluate(artifacts, windows, base, batch_size, on_artifact, work)
        if save_baseline:
            wanted = {"sglang", "llama.cpp"} if semantics is None else {semantics}
            for sem in sorted(wanted | {a.semantics for a in artifacts}):
                base.for_semantics(sem, batch_size, work)
            base.save(save_baseline)
        if work:
            work.finish()
    return results, base.label if base else None
