"""The `grokquant` command line: thin wrappers around library functions."""

from __future__ import annotations

import json
import math
import signal
import sys
import time

import click

from grokquant.errors import GrokquantError
from grokquant.io.paths import is_disk_full


POSITIVE = click.IntRange(min=1)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that it unwinds like Ctrl-C."""


_command_running = False


def _terminate(*_) -> None:
    # Only while the command runs: raised later, during interpreter shutdown (atexit callbacks, thread joins),
    # it could abort the process; by then there is nothing left to clean up and the process is exiting anyway.
    if _command_running:
        raise Terminated


class Group(click.Group):
    """Turns user-input errors into one line on stderr and exit code 2."""

    def invoke(self, ctx):
        global _command_running
        # SIGTERM unwinds like Ctrl-C, so temporary outputs are removed on the way out
        signal.signal(signal.SIGTERM, _terminate)
        try:
            try:
                _command_running = True
                return super().invoke(ctx)
            finally:
                _command_running = False
        except GrokquantError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except click.UsageError as exc:  # a bad option value: one line too, not usage + hint + error
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(2)
        except Exception as exc:  # the writers name their output (io.paths.full_disk_is_an_error); a fallback
            if not is_disk_full(exc):
                raise
            click.echo(f"error: no space left on device ({exc})", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Terminated:
            click.echo("terminated", err=True)
            sys.exit(143)


@click.group(cls=Group)
@click.version_option(package_name="grokquant")
def main():
    """Convert, quantize, run and validate xAI's Grok 2 from its original release files."""


@main.command()
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect(checkpoint, as_json):
    """Layout, config, parameter counts, size per format, and every problem found."""
    from grokquant.grok.checkpoint import scan
    from grokquant.grok.report import describe, render

    ckpt = scan(checkpoint)
    report = describe(ckpt)
    click.echo(json.dumps(report, indent=2) if as_json else render(report))
    if ckpt.problems:
        raise GrokquantError(ckpt.error_line())


@main.command()
@click.argument("out", type=click.Path())
@click.option("--preset", type=click.Choice(["tiny", "small", "odd"]),
              help="Shapes [default: tiny; with --train, the trained fixture's shapes].")
@click.option("--hidden", "hidden_size", type=int, help="hidden_size")
@click.option("--layers", "num_hidden_layers", type=int, help="num_hidden_layers")
@click.option("--experts", "num_local_experts", type=int, help="num_local_experts")
@click.option("--top-k", "num_experts_per_tok", type=int, help="num_experts_per_tok")
@click.option("--heads", "num_attention_heads", type=int, help="num_attention_heads")
@click.option("--kv-heads", "num_key_value_heads", type=int, help="num_key_value_heads")
@click.option("--head-dim", "head_dim", type=int, help="head_dim")
@click.option("--intermediate", "intermediate_size", type=int, help="dense MLP width")
@click.option("--moe-intermediate", "moe_intermediate_size", type=int, help="expert width (split 8 ways)")
@click.option("--vocab", "vocab_size", type=int, help="vocabulary size (the tokenizer is trained to it)")
@click.option("--layout", default="tp8", show_default=True, type=click.Choice(["tp8", "merged"]))
@click.option("--seed", default=0, show_default=True)
@click.option("--train", "train_text", help="Train on real text instead of writing random weights: "
              "builtin (the built-in corpus's training split) or a UTF-8 text file.")
@click.option("--steps", type=int, help="Training steps (with --train) [default: 600].")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def synth(out, preset, layout, seed, train_text, steps, force, **overrides):
    """Write a random (or, with --train, trained) Grok 2 checkpoint in the release's exact layout."""
    if train_text is None:
        from grokquant.grok.synth import synth as write

        if steps is not None:
            raise GrokquantError("--steps needs --train")
        path = write(out, preset=preset or "tiny", seed=seed, layout=layout, force=force, **overrides)
        click.echo(f"wrote {path} ({layout}, preset {preset or 'tiny'})")
        return
    from dataclasses import replace

    from grokquant.evaluate.train import TrainConfig, model_config, train

    tc = replace(TrainConfig(seed=seed), **({"steps": steps} if steps is not None else {}))
    every = max(1, tc.steps // 20)

    def progress(step, loss, lr):
        if step % every == 0 or step == tc.steps - 1:
            click.echo(f"step {step + 1:>5}/{tc.steps}  loss {loss:.3f}  lr {lr:.2e}", err=True)

    result = train(out, train_text, tc, model_config(preset, **overrides), layout=layout, force=force,
                   on_step=progress)
    click.echo(f"held-out perplexity {result.heldout_ppl:.2f} (unigram {result.unigram_ppl:.2f}), "
               f"{result.train_tokens} training tokens, {result.seconds:.0f} s")
    for layer, share in enumerate(result.expert_share):
        click.echo(f"layer {layer} expert share: " + " ".join(f"{100 * s:.1f}%" for s in share))
    click.echo(f"wrote {out} ({layout}, trained on {train_text})")


@main.command()
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output .gguf path.")
@click.option("--type", "ftype", help="llama.cpp file type: f32, f16, bf16, q8_0, q6_k, q5_k_m, q5_k_s, q5_1, "
              "q5_0, q4_k_m, q4_k_s, q4_1, q4_0, iq4_xs, iq4_nl, q3_k_l, q3_k_m, q3_k_s, iq3_m, iq3_s, iq3_xs, "
              "iq3_xxs, q2_k, q2_k_s, iq2_m, iq2_s, iq2_xs, iq2_xxs, iq1_m, iq1_s (iq3_xxs and below, and "
              "q2_k_s, need --imatrix).")
@click.option("--recipe", help="Recipe name under recipes/ or a YAML path (instead of --type).")
@click.option("--rope", default="plain", show_default=True, type=click.Choice(["plain", "yarn"]),
              help="plain: RoPE as the reference runtime computes it; yarn: what llama.cpp's own converter writes.")
@click.option("--imatrix", type=click.Path(dir_okay=False, exists=True), help="llama.cpp GGUF imatrix file.")
@click.option("--split-max-size", help="Write shards of at most this size (e.g. 50G).")
@click.option("--name", help="general.name (default: the checkpoint folder name).")
@click.option("--force", is_flag=True, help="Overwrite existing output.")
def convert(checkpoint, output, ftype, recipe, rope, imatrix, split_max_size, name, force):
    """Convert the original checkpoint to GGUF, streaming one tensor at a time."""
    from tqdm import tqdm

    from grokquant.gguf.convert import convert as run_convert, planned_summary
    from grokquant.calibrate.imatrix import load_imatrix
    from grokquant.quantize.recipe import GGUFRecipe, load_recipe
    from grokquant.runtime.sizes import parse_split_size

    if bool(ftype) == bool(recipe):
        raise GrokquantError("give exactly one of --type and --recipe")
    rec = load_recipe(recipe) if recipe else GGUFRecipe(name=ftype.lower(), ftype=ftype.lower())
    split_max_bytes = parse_split_size(split_max_size)
    imat = load_imatrix(imatrix) if imatrix else None
    start = time.perf_counter()
    tensors = []
    bar = None  # created once the plan is checked, so refusals print no empty bar

    def planned(plan, done_bytes):
        nonlocal bar
        tensors.extend(plan)
        bar = tqdm(total=sum(t.nbytes for t in plan), initial=done_bytes, unit="B", unit_scale=True,
                   desc=f"convert {rec.name}", file=sys.stderr)  # the rate and ETA count this run's bytes only

    def progress(t, nbytes):
        bar.set_postfix_str(f"{t.name} {t.type.name}", refresh=False)
        bar.update(nbytes)

    try:
        paths = run_convert(checkpoint, output, rec, rope=rope, split_max_bytes=split_max_bytes, imatrix=imat,
                            force=force, name=name, progress=progress, on_plan=planned,
                            notice=lambda message: click.echo(message, err=True))
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
    n_params = sum(math.prod(t.shape) for t in tensors)
    total = sum(t.nbytes for t in tensors)
    click.echo(f"wrote {', '.join(str(p) for p in paths)}: {len(tensors)} tensors, {total / 1e9:.3f} GB, "
               f"{8 * total / n_params:.3f} bits/weight, {seconds:.1f} s")
    for type_name, nbytes in sorted(planned_summary(tensors).items(), key=lambda kv: -kv[1]):
        click.echo(f"  {type_name:<8}{nbytes / 1e9:12.3f} GB")


@main.command()
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Statistics file (.safetensors): per layer and input group, Σx², token counts[, Hessians].")
@click.option("--data", default="builtin", show_default=True,
              help="A text file, a folder of text files, JSON Lines (text or prompt/response), or builtin.")
@click.option("--tokens", "n_tokens", default=8192, show_default=True, type=POSITIVE,
              help="Calibration tokens in total.")
@click.option("--seq-len", default=512, show_default=True, type=POSITIVE, help="Tokens per window.")
@click.option("--seed", default=0, show_default=True)
@click.option("--chat", is_flag=True, help="Render prompt/response pairs in Grok 2's chat format.")
@click.option("--imatrix", "imatrix_out", type=click.Path(dir_okay=False),
              help="Also write llama.cpp's GGUF imatrix (for llama-quantize --imatrix or convert --imatrix).")
@click.option("--hessians", is_flag=True, help="Also store full Hessians Σxxᵀ (small models only).")
@click.option("--min-tokens", default=64, show_default=True, type=click.IntRange(min=0),
              help="Flag experts that see fewer tokens.")
@click.option("--batch-size", default=8, show_default=True, type=POSITIVE,
              help="Sequences pushed through a layer at once.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
def calibrate(checkpoint, output, data, n_tokens, seq_len, seed, chat, imatrix_out, hessians, min_tokens,
              batch_size, device, force):
    """Collect per-expert calibration statistics, one layer at a time."""
    from tqdm import tqdm

    from grokquant.data.documents import calibration_tokens
    from grokquant.calibrate.statistics import (calibrate as run_calibrate, check_request, coverage_problems,
                                                render_coverage)
    from grokquant.runtime.load import open_source, resolve_device

    check_request(checkpoint, output, imatrix_out, force, batch_size)  # before the text is tokenized
    with open_source(checkpoint) as source:  # for its tokenizer, and the layer count the progress bar shows
        tokens = calibration_tokens(source.tokenizer(), data, n_tokens, seq_len, seed, chat)
        n_layers = source.config.num_hidden_layers
    with tqdm(total=n_layers, unit="layer", desc="calibrate", file=sys.stderr) as bar:
        per_layer = run_calibrate(checkpoint, output, tokens, imatrix_out=imatrix_out, hessians=hessians,
                                  batch_size=batch_size, device=resolve_device(device), force=force,
                                  dataset=str(data),
                                  metadata={"seed": seed, "chat": chat}, on_layer=lambda s: bar.update(1))
    click.echo(render_coverage(per_layer, min_tokens))
    low = coverage_problems(per_layer, min_tokens)
    click.echo(f"{tokens.numel()} tokens ({tokens.shape[0]} x {seq_len}); "
               f"{len(low)} expert(s) below {min_tokens} tokens" + (": " + ", ".join(
                   f"layer {l} expert {e} ({n})" for l, e, n in low[:8]) if low else ""))
    click.echo(f"wrote {output}" + (f" and {imatrix_out}" if imatrix_out else ""))


@main.command()
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(),
              help="Output directory (gptq recipes) or .gguf file (calibrated gguf recipes).")
@click.option("--recipe", default="gptq-w4g128", show_default=True,
              help="Recipe name under recipes/ or a YAML path: format gptq, or gguf with method imatrix/gptq.")
@click.option("--data", default="builtin", show_default=True, help="Calibration text (see `calibrate`).")
@click.option("--tokens", "n_tokens", default=8192, show_default=True, type=POSITIVE)
@click.option("--seq-len", default=512, show_default=True, type=POSITIVE)
@click.option("--seed", default=0, show_default=True)
@click.option("--chat", is_flag=True)
@click.option("--device", default="auto", show_default=True,
              help="cpu, cuda, cuda:N or auto (a GPU when there is one): where layers, Hessians and GPTQ run.")
@click.option("--batch-size", default=8, show_default=True, type=POSITIVE,
              help="Sequences pushed through a layer at once.")
@click.option("--expert-batch", type=POSITIVE, help="Experts loaded and quantized together [default: all]; "
              "1 holds one expert at a time (real Grok 2 widths on a 24 GB machine).")
@click.option("--rope", default="plain", show_default=True, type=click.Choice(["plain", "yarn"]),
              help="GGUF output only: RoPE keys written (see `convert`).")
@click.option("--target-bpw", type=float, help="GGUF recipes: bits per weight over all weight matrices; each "
              "tensor's type is chosen by its measured effect on the output instead of the ftype's mix.")
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
def quantize(checkpoint, output, recipe, data, n_tokens, seq_len, seed, chat, device, batch_size, expert_batch,
             rope, target_bpw, force):
    """Calibrated quantization (GPTQ directory or GGUF file); resumes after an interruption."""
    from tqdm import tqdm

    from grokquant.data.documents import calibration_tokens
    from grokquant.quantize.distributed import init_from_env
    from grokquant.io.paths import check_output
    from grokquant.quantize.recipe import GGUFRecipe, load_recipe, with_target_bpw
    from grokquant.quantize.run import check_request, quantize as run_quantize, read_report, render_report
    from grokquant.runtime.load import open_source, resolve_device

    rec = load_recipe(recipe)
    if target_bpw is not None:
        rec = with_target_bpw(rec, target_bpw)
    check_request(rec, batch_size=batch_size)  # before torchrun starts and the calibration text is tokenized
    check_output(output, [checkpoint], directory=not isinstance(rec, GGUFRecipe), force=force)
    group, device = init_from_env(resolve_device(device))  # torchrun: one rank of many
    with open_source(checkpoint) as source:  # for its tokenizer, and the layer count the progress bar shows
        check_request(rec, source.config, batch_size, expert_batch)  # group sizes against the model's widths
        tokens = calibration_tokens(source.tokenizer(), data, n_tokens, seq_len, seed, chat)
        n_layers = source.config.num_hidden_layers
    desc = f"quantize {rec.name}" + (f" ({group.world} ranks)" if group.world > 1 else "")
    bars = {}  # the sensitivity pass (--target-bpw) comes before the layers, each with its own bar

    def bar(name, total, unit):
        if name not in bars:
            bars[name] = tqdm(total=total, unit=unit, desc=name, file=sys.stderr, disable=not group.is_main)
        return bars[name]

    def on_probe(done, total):
        b = bar("sensitivity", total, "tensor")
        b.update(done - b.n)
        if done == total:
            b.close()
            bar(desc, n_layers, "layer")

    def on_layer(layer):
        bar(desc, n_layers, "layer").update(1)

    if getattr(rec, "target_bpw", None) is None:  # no sensitivity pass first
        bar(desc, n_layers, "layer")
    try:
        out = run_quantize(checkpoint, output, rec, tokens, force=force, batch_size=batch_size, device=device,
                           rope=rope, expert_batch=expert_batch, on_layer=on_layer, on_probe=on_probe)
    finally:
        for b in bars.values():
            b.close()
    if not group.is_main:
        return
    with open_source(out) as written:
        size = written.size_bytes()
    click.echo(render_report(read_report(out)))
    click.echo(f"wrote {out}: {size / 1e9:.3f} GB ({rec.method}, recipe {rec.name}, {tokens.numel()} calibration "
               f"tokens, {device})")


@main.command()
@click.argument("artifact", type=click.Path(exists=True))
@click.option("--prompt", required=True)
@click.option("--max-new-tokens", default=32, show_default=True, type=click.IntRange(min=0))
@click.option("--chat", is_flag=True, help="Wrap the prompt in Grok 2's chat format.")
@click.option("--engine", default="torch", show_default=True, type=click.Choice(["torch", "llama.cpp"]),
              help="llama.cpp runs GGUF files through llama-cpp-python.")
@click.option("--semantics", type=click.Choice(["sglang", "llama.cpp", "llama.cpp-yarn"]),
              help="Forward-pass semantics of the torch engine (default: sglang for checkpoints and GPTQ, "
                   "the file's own for GGUF).")
@click.option("--temperature", default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling mass.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--gpu-memory", help="Weights + KV cache allowed per GPU (e.g. 22GiB); the rest rests in CPU memory.")
@click.option("--cpu-memory", help="CPU memory allowed for offloaded weights (e.g. 120GiB).")
def run(artifact, prompt, max_new_tokens, chat, engine, semantics, temperature, top_p, seed, device, gpu_memory,
        cpu_memory):
    """Stream generated text from a checkpoint, a GPTQ directory or a GGUF file."""
    from grokquant.runtime.generate import generate
    from grokquant.grok.tokenizer import format_chat

    pieces = generate(artifact, prompt, max_new_tokens, chat, engine, semantics, temperature, top_p, seed,
                      device, gpu_memory, cpu_memory)  # refuses bad input before anything is printed
    click.echo(format_chat([{"role": "user", "content": prompt}]) if chat else prompt, nl=False)
    for piece in pieces:
        click.echo(piece, nl=False)
    click.echo()


@main.command()
@click.argument("checkpoint", required=False, type=click.Path(exists=True))
@click.option("--recipe", help="A recipe name or YAML path, or a llama.cpp file type (bf16, q8_0, ...). "
              "Without it: every recipe's size, which fit, and the best that fits.")
@click.option("--gpu", "gpu_memory", default="24GiB", show_default=True, help="Memory of each GPU.")
@click.option("--gpus", "n_gpus", default=1, show_default=True, type=click.IntRange(min=0),
              help="Number of GPUs (0: CPU only).")
@click.option("--ram", default="128GiB", show_default=True, help="CPU memory for weights.")
@click.option("--context", default=4096, show_default=True, type=click.IntRange(min=0),
              help="Tokens of KV cache to reserve.")
@click.option("--reserve", default="1GiB", show_default=True, help="Kept free on each GPU (CUDA context, activations).")
def plan(checkpoint, recipe, gpu_memory, n_gpus, ram, context, reserve):
    """Sizes per tensor class, KV cache and placement over GPUs and RAM (real Grok 2 unless CHECKPOINT)."""
    from grokquant.grok.tokenizer import load_tokenizer
    from grokquant.runtime.choose import best, choose, render_choices
    from grokquant.runtime.load import open_source
    from grokquant.runtime.plan import plan as make, render
    from grokquant.runtime.sizes import parse_memory

    cfg = tok = None
    if checkpoint:
        with open_source(checkpoint) as source:
            cfg = source.config
            tok = load_tokenizer(source.tokenizer_path) if source.tokenizer_path else None
    memory = (parse_memory(gpu_memory), n_gpus, parse_memory(ram), context, parse_memory(reserve))
    if recipe:
        report = make(recipe, *memory, cfg, tok)
        click.echo(render(report))
        if not report.problem:
            return
    from grokquant.grok.config import GrokConfig

    choices = choose(cfg or GrokConfig(), *memory, tok)
    pick = next((c for c in choices if c.fits and c.kld is not None), None)
    click.echo(render_choices(choices, pick))
    if pick is not None:
        click.echo(f"\nbest that fits: {pick.name} ({pick.report.file_bytes / 1e9:.2f} GB, mean KLD {pick.kld:.5f}); "
                   f"make it with: {pick.command}\n")
        click.echo(render(pick.report))
    if recipe:
        raise GrokquantError(f"{recipe} does not fit: {report.problem}" +
                             (f"; the best that fits is {pick.name}" if pick else ""))
    best(choices)  # none fits: one line, exit 2


@main.command(name="eval")
@click.argument("artifacts", nargs=-1, type=click.Path(exists=True))
@click.option("--data", default="builtin", show_default=True,
              help="builtin (the built-in corpus's held-out split), a text file (tokenized whole, as "
                   "llama-perplexity does), a folder of text files or JSON Lines.")
@click.option("--ctx", default=512, show_default=True, type=POSITIVE, help="Tokens per window.")
@click.option("--stride", type=POSITIVE, help="Tokens between window starts [default: ctx]; each window scores its "
              "last min(stride, ctx/2 - 1) tokens.")
@click.option("--chunks", type=POSITIVE, help="Evaluate only the first N windows.")
@click.option("--baseline", type=click.Path(exists=True),
              help="Compare against this artifact, or against logits saved by --save-baseline.")
@click.option("--save-baseline", type=click.Path(dir_okay=False),
              help="Save the baseline's top-k log-probabilities (.safetensors) for reuse with --baseline.")
@click.option("--top-k", default=256, show_default=True, type=POSITIVE,
              help="Baseline log-probabilities kept per token.")
@click.option("--engine", default="torch", show_default=True, type=click.Choice(["torch", "llama.cpp", "both"]),
              help="How GGUF files run: our model, llama.cpp (llama-cpp-python), or a row for each.")
@click.option("--semantics", type=click.Choice(["sglang", "llama.cpp", "llama.cpp-yarn"]),
              help="Forward-pass semantics of the torch engine [default: sglang; a GGUF's own for GGUF].")
@click.option("--batch-size", default=8, show_default=True, type=POSITIVE, help="Windows per forward pass.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False),
              help="Write a figure: perplexity vs size, KL divergence distribution (needs matplotlib).")
@click.option("--force", is_flag=True, help="Overwrite an existing --save-baseline file.")
def eval_(artifacts, data, ctx, stride, chunks, baseline, save_baseline, top_k, engine, semantics, batch_size,
          as_json, plot_path, force):
    """Perplexity of checkpoints, GPTQ directories and GGUF files; KL divergence, top-1 agreement
    and Δp against a baseline (the statistics of llama-perplexity --kl-divergence)."""
    from grokquant.evaluate.report import plot, render, require_matplotlib, to_json
    from grokquant.evaluate.run import run_eval

    if plot_path:
        require_matplotlib()  # before the evaluation, not after it
    def progress(row):
        click.echo(f"{row['artifact']}: PPL {row['ppl']:.3f}", err=True)

    results, label = run_eval(artifacts, data, ctx, stride, chunks, baseline, save_baseline, top_k, engine,
                              semantics, batch_size, on_artifact=progress, force=force,
                              on_message=lambda line: click.echo(line, err=True))
    if plot_path and results:
        plot(results, plot_path)
    if as_json:
        click.echo(json.dumps({"baseline": label, "results": to_json(results)}, indent=2))
    elif results:
        click.echo(render(results, label))
    if save_baseline:
        click.echo(f"wrote {save_baseline}", err=True)
