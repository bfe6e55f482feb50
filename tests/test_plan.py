"""`grokquant plan` for the real Grok 2: sizes derived from the release's config, plausible placements, llama.cpp flags."""

import re

import pytest
from click.testing import CliRunner

from grokquant.cli import main
from grokquant.grok.config import GrokConfig
from grokquant.runtime.placement import GiB
from grokquant.runtime.plan import layer_regex, plan, render
from grokquant.runtime.sizes import format_bytes


@pytest.fixture(scope="module")
def q4km_1gpu():
    return plan("q4_k_m", 24 * GiB, 1, 192 * GiB)


def test_sizes_agree_with_the_release(q4km_1gpu):
    assert round(q4km_1gpu.total_bytes / 1e9, 1) == 164.0  # llama.cpp's Q4_K_M mix (llama-quant.cpp) over the release's 269.5B parameters: 164.0 GB (152.8 GiB)
    assert round(q4km_1gpu.total_bytes / GiB, 1) == 152.8
    assert round(plan("bf16", 24 * GiB, 0, 1024 * GiB).total_bytes / 1e9, 1) == 539.0
    gptq = plan("gptq-w4g128", 24 * GiB, 1, 192 * GiB)
    assert gptq.total_bytes == format_bytes(GrokConfig())["gptq_int4_g128"]
    # 4.125 bpw (int4 + fp16 scale per 128) plus packed zeros and g_idx on the quantized classes
    assert gptq.classes["experts"].bpw == pytest.approx(4.16, abs=0.01)
    assert gptq.classes["embedding"].bpw == 16  # embedding and lm_head stay bf16
    assert q4km_1gpu.kv_bytes == 4096 * 64 * 2 * 8 * 128 * 2  # 1 GiB at 4096 tokens


def test_one_24gib_gpu_with_192gib_ram(q4km_1gpu):
    p, sizes = q4km_1gpu.placement, q4km_1gpu.sizes
    assert p.layers == ["cuda:0"] * 64  # every layer's attention and router on the GPU
    assert p.offloaded_layers("experts") == list(range(64))  # all experts in RAM first
    assert 0 < len(p.offloaded_layers("dense_mlp")) < 64  # then as many dense MLPs as needed
    assert p.gpu_bytes(sizes)["cuda:0"] <= 23 * GiB
    assert p.cpu_bytes(sizes) <= 192 * GiB and p.expert_cache["cuda:0"] >= 2
    flags = " ".join(q4km_1gpu.flags)
    assert "-ngl 64" in flags and r'-ot "blk\.\d+\.ffn_(gate|up|down)_exps\.weight=CPU"' in flags
    dense = re.search(r'-ot "blk\\\.(\(.*?\))\\\.ffn_\(gate\|up\|down\)\\\.weight=CPU"', flags)
    offloaded = [i for i in range(64) if re.fullmatch(dense[1], str(i))]
    assert offloaded == p.offloaded_layers("dense_mlp")
    text = render(q4km_1gpu)
    assert "164.0" in text and "per generated token over PCIe" in text and "cuda:0: layers 0-63" in text


def test_four_24gib_gpus():
    report = plan("gptq-w4g128", 24 * GiB, 4, 128 * GiB)
    p, sizes = report.placement, report.sizes
    assert p.gpus == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert p.layers == sorted(p.layers)  # contiguous layer ranges per GPU, in order
    assert p.offloaded_layers("dense_mlp") == []
    assert 0 < len(p.offloaded_layers("experts")) < 64  # most experts stay on the GPUs
    assert all(b <= 23 * GiB for b in p.gpu_bytes(sizes).values())
    ts = re.search(r"-ts ([\d,]+)", " ".join(report.flags))[1]
    assert [int(n) for n in ts.split(",")] == [p.layers.count(g) for g in p.gpus] and sum(map(int, ts.split(","))) == 64
    assert report.placement.transfer_bytes_per_token(sizes) < plan("gptq-w4g128", 24 * GiB, 1, 192 * GiB) \
        .placement.transfer_bytes_per_token(sizes)


def test_says_clearly_when_it_cannot_fit():
    report = plan("bf16", 24 * GiB, 1, 64 * GiB)
    assert report.placement is None and "CPU memory" in report.problem
    assert "DOES NOT FIT" in render(report)
    res = CliRunner().invoke(main, ["plan", "--recipe", "bf16", "--ram", "64GiB"])
    assert res.exit_code == 2 and "error: bf16 does not fit" in res.output and "Traceback" not in res.output


def test_cli_for_a_checkpoint(tiny_tp8):
    res = CliRunner().invoke(main, ["plan", str(tiny_tp8), "--recipe", "gptq-w4g128", "--gpu", "1MiB", "--gpus", "2",
                                    "--ram", "1GiB", "--reserve", "0", "--context", "64"])
    assert res.exit_code == 0, res.output
    assert "2 layers" in res.output and "llama.cpp: -c 64" in res.output


def testlayer_regex():
    for layers in ([31, 32, 33, 34, 35, 36, 37, 38, 39] + list(range(40, 64)), list(range(12)), [5], [1, 3, 12]):
        pattern = layer_regex(layers)
        assert [i for i in range(100) if re.fullmatch(pattern, str(i))] == layers
