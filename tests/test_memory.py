"""Peak RSS of `inspect` and of a full layer-by-layer pass must not grow with the number of layers."""

import sys

import pytest

from grokquant.profiling import python_measured, run_measured
from grokquant.grok.synth import synth

from conftest import WIDE

LAYER_F32_BYTES = 4 * (8 * 3 * 256 * 4096 + 3 * 256 * 2048 + 4 * 256 * 256)

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
ckpt = Checkpoint.open(sys.argv[1])
logits = streamed_logits(ckpt, torch.arange(64).view(2, 32))
assert torch.isfinite(logits).all()
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, wide_tp8):
    return {2: wide_tp8, 8: synth(tmp_path_factory.mktemp("mem") / "l8", "tiny", num_hidden_layers=8, **WIDE)}


def test_layer_pass_memory_is_bounded(checkpoints):
    base = python_measured(BASELINE).peak_rss
    peaks = {}
    for n, path in checkpoints.items():
        m = python_measured(STREAM, str(path))
        assert m.returncode == 0, m.stderr
        peaks[n] = m.peak_rss
    # keeping anything per layer would add 6 x that; allocator noise is a fraction of one layer
    assert peaks[8] - peaks[2] < 0.75 * LAYER_F32_BYTES, peaks
    # about one layer: the float32 copy plus the bf16 tensors it came from
    assert peaks[8] - base < 2.0 * LAYER_F32_BYTES, (base, peaks)


def test_inspect_memory_is_bounded(checkpoints):
    peaks = {}
    for n, path in checkpoints.items():
        m = run_measured([sys.executable, "-m", "grokquant", "inspect", str(path)])
        assert m.returncode == 0, m.stderr
        peaks[n] = m.peak_rss
    assert abs(peaks[8] - peaks[2]) < 20e6, peaks


def test_convert_memory_is_bounded(checkpoints, tmp_path):
    peaks = {}
    for n, path in checkpoints.items():
        m = run_measured([sys.executable, "-m", "grokquant", "convert", str(path), "-o", str(tmp_path / f"{n}.gguf"),
                          "--type", "q8_0"])
        assert m.returncode == 0, m.stderr
        peaks[n] = m.peak_rss
    assert peaks[8] - peaks[2] < 0.75 * LAYER_F32_BYTES, peaks


QUANTIZE = """
import sys, torch
from grokquant.quantize.run import quantize
from grokquant.quantize.recipe import GPTQRecipe
tokens = torch.randint(0, 500, (4, 64), generator=torch.Generator().manual_seed(0))
quantize(sys.argv[1], sys.argv[2], GPTQRecipe(method="rtn"), tokens, expert_batch=int(sys.argv[3]))
"""


@pytest.mark.slow  # long: `make test-slow` (keeps the default run under 10 min on 2 cores)
def test_quantize_one_expert_at_a_time_bounds_memory(wide_tp8, tmp_path):
    """--expert-batch 1 holds one expert's weights and Hessians, not all eight of the layer."""
    base = python_measured(BASELINE).peak_rss
    peaks = {}
    for batch in (8, 1):
        m = python_measured(QUANTIZE, str(wide_tp8), str(tmp_path / f"q{batch}"), str(batch))
        assert m.returncode == 0, m.stderr[-2000:]
        peaks[batch] = m.peak_rss - base
    experts_f32 = 4 * 8 * (3 * 256 * 4096 + 4096 * 4096)  # weights plus w2 Hessians of 8 experts
    print({k: f"{v / 2**20:.0f} MiB" for k, v in peaks.items()}, f"experts {experts_f32 / 2**20:.0f} MiB")
    assert peaks[1] < peaks[8] - 0.5 * experts_f32



CALIBRATE = """
import sys, torch
from grokquant.calibrate.statistics import calibrate
tokens = torch.randint(0, 500, (4, 64), generator=torch.Generator().manual_seed(0))
calibrate(sys.argv[1], sys.argv[2], tokens)
"""


def test_calibrate_peak_does_not_grow_with_the_experts(tmp_path):
    """The imatrix pass loads the dense part, then one expert at a time: 8 experts cost what 2 do."""
    peaks = {}
    for n in (2, 8):
        path = synth(tmp_path / f"e{n}", "tiny", seed=3, num_hidden_layers=2, num_local_experts=n, **WIDE)
        m = python_measured(CALIBRATE, str(path), str(tmp_path / f"stats{n}.safetensors"))
        assert m.returncode == 0, m.stderr[-2000:]
        peaks[n] = m.peak_rss
    expert_f32 = 4 * 3 * 256 * 4096
    print({k: f"{v / 2**20:.0f} MiB" for k, v in peaks.items()}, f"6 experts {6 * expert_f32 / 2**20:.0f} MiB")
    assert peaks[8] - peaks[2] < 0.4 * 6 * expert_f32  # a whole layer at once: most of the 6 experts' 72 MiB


@pytest.mark.slow  # long: `make test-slow` (keeps the default run under 10 min on 2 cores)
def test_quantize_peak_does_not_grow_with_layers(checkpoints, tmp_path):
    """Per layer only the hidden states carry over: 8 layers peak where 2 do."""
    peaks = {}
    for n, path in checkpoints.items():
        m = python_measured(QUANTIZE, str(path), str(tmp_path / f"q{n}"), "1")
        assert m.returncode == 0, m.stderr[-2000:]
        peaks[n] = m.peak_rss
    print({k: f"{v / 2**20:.0f} MiB" for k, v in peaks.items()})
    assert peaks[8] - peaks[2] < 0.75 * LAYER_F32_BYTES, peaks
