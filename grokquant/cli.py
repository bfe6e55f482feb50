"""The `grokquant` command line: thin wrappers around library functions."""

from __future__ import annotations

import json
import sys

import click

from .errors import GrokquantError


class Group(click.Group):
    """Turns user-input errors into one line on stderr and exit code 2."""

    def invoke(self, ctx):
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


@main.command()
@click.argument("checkpoint", type=click.Path(file_okay=False))
@click.option("--prompt", required=True)
@click.option("--max-new-tokens", default=32, show_default=True)
@click.option("--chat", is_flag=True, help="Wrap the prompt in Grok 2's chat format.")
@click.option("--semantics", default="sglang", show_default=True,
              type=click.Choice(["sglang", "llama.cpp", "llama.cpp-yarn"]))
def run(checkpoint, prompt, max_new_tokens, chat, semantics):
    """Generate text (greedy) from an original checkpoint, on CPU."""
    from .checkpoint import Checkpoint
    from .model import Grok2ForCausalLM
    from .tokenizer import format_chat, load_tokenizer

    ckpt = Checkpoint.open(checkpoint)
    tok = load_tokenizer(ckpt.tokenizer_path)
    text = format_chat([{"role": "user", "content": prompt}]) if chat else prompt
    model = Grok2ForCausalLM.from_checkpoint(ckpt, semantics)
    ids = tok.encode(text)
    stops = tuple(i for i in (tok.eos_id, tok.separator_id) if i is not None)
    printer = _StreamPrinter(tok)
    click.echo(text, nl=False)
    model.generate(ids, max_new_tokens, stops, on_token=printer)
    printer.flush()
    click.echo()


class _StreamPrinter:
    """Prints tokens as they come, holding back bytes that do not yet form whole characters."""

    def __init__(self, tok):
        self.tok, self.pending = tok, b""

    def __call__(self, token: int) -> None:
        self.pending += self.tok.decode_bytes([token])
        try:
            text = self.pending.decode("utf-8")
        except UnicodeDecodeError:
            return
        click.echo(text, nl=False)
        self.pending = b""

    def flush(self) -> None:
        if self.pending:
            click.echo(self.pending.decode("utf-8", errors="replace"), nl=False)
