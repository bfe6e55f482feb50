"""Peak RSS of `inspect` and of a streamed layer-by-layer forward pass versus the number of layers.

    python benchmarks/memory.py [--layers 2 4 8] [--hidden 512] [--moe 4096]

Peak memory must stay flat as layers are added: about one layer's weights (float32 copy plus
the bf16 tensors read) over the interpreter's baseline.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

from grokquant.grok.config import GrokConfig
from grokquant.profiling import python_measured, run_measured
from grokquant.grok.synth import synth

# interpreter, torch, and torch's meta-device machinery (a fixed cost, loaded on first use)
BASELINE = """
from grokquant.grok.model import Grok2ForCausalLM
from grokquant.grok.synth import synth_config
Grok2ForCausalLM.empty(synth_config("tiny"))
"""

STREAM = """
import sys, torch
from grokquant.grok.checkpoint import Checkpoint
from grokquant.grok.streaming import streamed_logits
logits = streamed_logits(Checkpoint.open(sys.argv[1]), torch.arange(128).view(2, 64))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--moe", type=int, default=4096)
    args = ap.parse_args()

    base = python_measured(BASELINE).peak_rss
    print(f"baseline (interpreter, torch, meta-device model): {base / 2**20:.0f} MiB")
    print(f"{'layers':>6} {'layer f32 MiB':>14} {'inspect MiB':>12} {'layer pass MiB':>15} {'over base / layer':>18}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.layers:
            path = synth(Path(tmp) / f"l{n}", "tiny", num_hidden_layers=n, hidden_size=args.hidden,
                         moe_intermediate_size=args.moe, intermediate_size=args.moe // 2)
            cfg = GrokConfig.from_file(path / "config.json")
            layer = 4 * sum(math.prod(s) for s in cfg.layer_shapes(0).values())
            ins = run_measured([sys.executable, "-m", "grokquant", "inspect", str(path)])
            run = python_measured(STREAM, str(path))
            if ins.returncode or run.returncode:
                sys.exit(ins.stderr + run.stderr)
            print(f"{n:>6} {layer / 2**20:>14.0f} {ins.peak_rss / 2**20:>12.0f} {run.peak_rss / 2**20:>15.0f} "
                  f"{(run.peak_rss - base) / layer:>18.2f}")


if __name__ == "__main__":
    main()
