"""The `grokquant` command line: thin wrappers around library functions."""

from __future__ import annotations

import json
import math
import re
import signal
import sys
import time

import click

from .errors import GrokquantError


class Group(click.Group):
    """Turns user-input errors into one line on stderr and exit code 2."""

    def invoke(self, ctx):
        # SIGTERM unwinds like Ctrl-C, so temporary outputs are removed on the way out
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        try:
            return super().invoke(ctx)
        except GrokquantError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)


@click.group(cls=Group)
@click.version_option(package_name="grokquant")
def main():
    """Convert, quantize, run and validate xAI's Grok 2 from its original release files."""


@main.command()
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect(checkpoint, as_json):
    """Layout, config, parameter counts, size per format, and every problem found."""
    from .checkpoint import scan
    from .report import describe, render

    ckpt = scan(checkpoint)
    report = describe(ckpt)
    click.echo(json.dumps(report, indent=2) if as_json else render(report))
    if ckpt.problems:
        raise GrokquantError(ckpt.error_line())


@main.command()
@click.argument("out", type=click.Path())
@click.option("--preset", default="tiny", show_default=True, type=click.Choice(["tiny", "small", "odd"]))
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
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def synth(out, preset, layout, seed, force, **overrides):
    """Write a random Grok 2 checkpoint in the release's exact layout."""
    from .synth import synth as write

    path = write(out, preset=preset, seed=seed, layout=layout, force=force, **overrides)
    click.echo(f"wrote {path} ({layout}, preset {preset})")


def parse_size(text: str | None) -> int | None:
    """'2G', '500M', '64K' or a byte count -> bytes (powers of 1000, as llama-gguf-split)."""
    if text is None:
        return None
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)B?", text.strip().upper())
    if not m:
        raise GrokquantError(f"cannot parse size {text!r} (e.g. 500M, 2G)")
    return int(float(m[1]) * 1000 ** " KMGT".index(m[2] or " "))


@main.command()
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output .gguf path.")
@click.option("--type", "ftype", help="llama.cpp file type: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, "
              "q4_k_s, q4_k_m, q5_k_s, q5_k_m, q6_k, iq4_xs, iq4_nl.")
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

    from .export.gguf import convert as run_convert, plan, planned_summary
    from .imatrix import load_imatrix
    from .recipe import GGUFRecipe, load_recipe

    if bool(ftype) == bool(recipe):
        raise GrokquantError("give exactly one of --type and --recipe")
    rec = load_recipe(recipe) if recipe else GGUFRecipe(name=ftype.lower(), ftype=ftype.lower())
    if not isinstance(rec, GGUFRecipe):
        raise GrokquantError(f"recipe {rec.name} is a {rec.format} recipe: use `grokquant quantize`")
    imat = load_imatrix(imatrix) if imatrix else None
    from .checkpoint import Checkpoint

    with Checkpoint.open(checkpoint) as ckpt:
        tensors = plan(ckpt.config, rec, has_imatrix=imat is not None)
    n_params = sum(math.prod(t.shape) for t in tensors)
    total = sum(t.nbytes for t in tensors)
    start = time.perf_counter()
    bar = None  # created once writing starts, so refusals print no empty bar

    def progress(t, nbytes):
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"convert {rec.name}", file=sys.stderr)
        bar.set_postfix_str(f"{t.name} {t.type.name}", refresh=False)
        bar.update(nbytes)

    try:
        paths = run_convert(checkpoint, output, rec, rope=rope, split_max_bytes=parse_size(split_max_size),
                            imatrix=imat, force=force, name=name, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start
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
@click.option("--tokens", "n_tokens", default=8192, show_default=True, help="Calibration tokens in total.")
@click.option("--seq-len", default=512, show_default=True, help="Tokens per window.")
@click.option("--seed", default=0, show_default=True)
@click.option("--chat", is_flag=True, help="Render prompt/response pairs in Grok 2's chat format.")
@click.option("--imatrix", "imatrix_out", type=click.Path(dir_okay=False),
              help="Also write llama.cpp's GGUF imatrix (for llama-quantize --imatrix or convert --imatrix).")
@click.option("--hessians", is_flag=True, help="Also store full Hessians Σxxᵀ (small models only).")
@click.option("--min-tokens", default=64, show_default=True, help="Flag experts that see fewer tokens.")
@click.option("--batch-size", default=8, show_default=True, help="Sequences pushed through a layer at once.")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
def calibrate(checkpoint, output, data, n_tokens, seq_len, seed, chat, imatrix_out, hessians, min_tokens,
              batch_size, force):
    """Collect per-expert calibration statistics, one layer at a time."""
    from tqdm import tqdm

    from .calib_data import calibration_tokens
    from .calibrate import calibrate as run_calibrate, coverage_problems, render_coverage
    from .checkpoint import Checkpoint
    from .tokenizer import load_tokenizer

    with Checkpoint.open(checkpoint) as ckpt:
        tokens = calibration_tokens(load_tokenizer(ckpt.tokenizer_path), data, n_tokens, seq_len, seed, chat)
        n_layers = ckpt.config.num_hidden_layers
    with tqdm(total=n_layers, unit="layer", desc="calibrate", file=sys.stderr) as bar:
        per_layer = run_calibrate(checkpoint, output, tokens, imatrix_out=imatrix_out, hessians=hessians,
                                  batch_size=batch_size, force=force, dataset=str(data),
                                  metadata={"seed": seed, "chat": chat}, on_layer=lambda s: bar.update(1))
    click.echo(render_coverage(per_layer, min_tokens))
    low = coverage_problems(per_layer, min_tokens)
    click.echo(f"{tokens.numel()} tokens ({tokens.shape[0]} x {seq_len}); "
               f"{len(low)} expert(s) below {min_tokens} tokens" + (": " + ", ".join(
                   f"layer {l} expert {e} ({n})" for l, e, n in low[:8]) if low else ""))
    click.echo(f"wrote {output}" + (f" and {imatrix_out}" if imatrix_out else ""))


@main.command()
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--recipe", default="gptq-w4g128", show_default=True, help="A gptq recipe name or YAML path.")
@click.option("--data", default="builtin", show_default=True, help="Calibration text (see `calibrate`).")
@click.option("--tokens", "n_tokens", default=8192, show_default=True)
@click.option("--seq-len", default=512, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--chat", is_flag=True)
@click.option("--force", is_flag=True, help="Overwrite an existing output directory.")
def quantize(checkpoint, output, recipe, data, n_tokens, seq_len, seed, chat, force):
    """Calibrated GPTQ / round-to-nearest artifact (auto-gptq format); resumes after an interruption."""
    from tqdm import tqdm

    from .calib_data import calibration_tokens
    from .checkpoint import Checkpoint
    from .quantize import quantize as run_quantize
    from .recipe import GPTQRecipe, load_recipe
    from .tokenizer import load_tokenizer

    rec = load_recipe(recipe)
    if not isinstance(rec, GPTQRecipe):
        raise GrokquantError(f"recipe {rec.name} is a GGUF recipe: use `grokquant convert`")
    with Checkpoint.open(checkpoint) as ckpt:
        tokens = calibration_tokens(load_tokenizer(ckpt.tokenizer_path), data, n_tokens, seq_len, seed, chat)
        n_layers = ckpt.config.num_hidden_layers
    with tqdm(total=n_layers, unit="layer", desc=f"quantize {rec.name}", file=sys.stderr) as bar:
        out = run_quantize(checkpoint, output, rec, tokens, force=force, on_layer=lambda l: bar.update(1))
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    click.echo(f"{'class':<12}{'bits':>5}{'calib. error vs RTN':>21}{'fewest tokens':>15}")
    for row in json.loads((out / "quantize_report.json").read_text()):
        click.echo(f"{row['class']:<12}{row['bits']:>5}{-100 * row['reduction_vs_rtn']:>20.1f}%{row['min_tokens']:>15}")
    click.echo(f"wrote {out}: {size / 1e9:.3f} GB ({rec.method}, recipe {rec.name}, {tokens.numel()} calibration tokens)")


@main.command()
@click.argument("artifact", type=click.Path(exists=True))
@click.option("--prompt", required=True)
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--chat", is_flag=True, help="Wrap the prompt in Grok 2's chat format.")
@click.option("--engine", default="torch", show_default=True, type=click.Choice(["torch", "llama.cpp"]),
              help="llama.cpp runs GGUF files through llama-cpp-python.")
@click.option("--semantics", type=click.Choice(["sglang", "llama.cpp", "llama.cpp-yarn"]),
              help="Forward-pass semantics of the torch engine (default: sglang for checkpoints, "
                   "the file's own for GGUF).")
def run(artifact, prompt, max_new_tokens, chat, engine, semantics):
    """Generate text (greedy) from a checkpoint or a GGUF file, on CPU."""
    from .generate import generate
    from .tokenizer import format_chat

    click.echo(format_chat([{"role": "user", "content": prompt}]) if chat else prompt, nl=False)
    for piece in generate(artifact, prompt, max_new_tokens, chat, engine, semantics):
        click.echo(piece, nl=False)
    click.echo()
