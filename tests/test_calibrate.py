import json

import torch
from gguf import GGUFReader

from grokquant.calibrate.statistics import collect, coverage_problems, imatrix_entries, load_stats, save_stats
from grokquant.grok.checkpoint import Checkpoint
from grokquant.calibrate.imatrix import load_imatrix, save_imatrix
from grokquant.grok.model import Grok2ForCausalLM, rope_cos_sin
from grokquant.grok.synth import random_slice, synth_config, write_checkpoint

import killed_cli


def test_statistics_equal_independent_computation(tiny_tp8):
    ckpt = Checkpoint.open(tiny_tp8)
    cfg = ckpt.config
    tokens = torch.randint(0, 500, (3, 16), generator=torch.Generator().manual_seed(0))
    stats = list(collect(ckpt, tokens, hessians=True, batch_size=2))
    assert [s.layer for s in stats] == list(range(cfg.num_hidden_layers))

    # layer 0 by hand: inputs of q/k/v and of each expert's w1/w3 (only the tokens routed to it)
    model = Grok2ForCausalLM.from_checkpoint(ckpt)
    layer = model.model.layers[0]
    h = model.embed(tokens).reshape(-1, cfg.hidden_size)
    a = layer.pre_attn_norm(h)
    s0 = stats[0]
    assert torch.allclose(s0.hessian["attn_qkv"], a.T @ a, rtol=1e-4, atol=1e-3)
    assert torch.allclose(s0.sum2["attn_qkv"], (a * a).sum(0), rtol=1e-4)
    assert s0.count["attn_qkv"] == tokens.numel()

    hidden = model.embed(tokens)
    positions = torch.arange(tokens.shape[1])
    cos, sin = rope_cos_sin(positions, cfg, model.sem)
    attn = layer.self_attn(layer.pre_attn_norm(hidden), positions, cos, sin, None, 0, model.sem)
    m = layer.pre_moe_norm(hidden + layer.post_attn_norm(attn)).reshape(-1, cfg.hidden_size)
    _, ids = layer.block_sparse_moe.route(m, model.sem)
    for e in range(cfg.num_local_experts):
        routed = m[(ids == e).any(-1)]
        assert s0.count[f"expert{e}_w13"] == routed.shape[0]
        assert torch.allclose(s0.hessian[f"expert{e}_w13"], routed.T @ routed, rtol=1e-4, atol=1e-3)
    assert sum(s0.expert_tokens(cfg.num_local_experts)) == tokens.numel() * cfg.num_experts_per_tok


def test_stats_and_imatrix_files_round_trip(tiny_tp8, tmp_path):
    ckpt = Checkpoint.open(tiny_tp8)
    tokens = torch.randint(0, 500, (2, 32), generator=torch.Generator().manual_seed(1))
    stats = list(collect(ckpt, tokens))
    save_stats(tmp_path / "s.safetensors", stats, {"x": 1})
    again = load_stats(tmp_path / "s.safetensors")
    assert [s.count for s in again] == [s.count for s in stats]
    sums, counts = {}, {}
    for s in stats:
        for name, (a, c) in imatrix_entries(s, 8).items():
            sums[name], counts[name] = a, c
    save_imatrix(tmp_path / "im.gguf", sums, counts, ["builtin"], 2, 32)
    reader = GGUFReader(tmp_path / "im.gguf")  # gguf-py, as llama.cpp's tools read it
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    assert shapes["blk.1.ffn_down_exps.weight.in_sum2"] == (512, 8)  # ne = [n, n_expert]
    assert shapes["blk.1.ffn_down_exps.weight.counts"] == (1, 8)
    assert shapes["blk.0.attn_v.weight.in_sum2"] == (256, 1)
    assert len(shapes) == 2 * 2 * 10  # 10 quantizable weights per layer, in_sum2 + counts each
    imp = load_imatrix(tmp_path / "im.gguf")
    c = counts["blk.0.ffn_up_exps.weight"]
    expect = torch.where(c[:, None] > 0, sums["blk.0.ffn_up_exps.weight"] / c.clamp(min=1)[:, None], 1.0)
    assert torch.allclose(imp["blk.0.ffn_up_exps.weight"], expect)


def test_expert_without_tokens_is_reported(tmp_path):
    cfg = synth_config("tiny", num_hidden_layers=1)
    base = random_slice(cfg, 0)

    # router rows a_e * u: the top-2 are always the two largest or the two smallest a_e, so the
    # experts with middle values (4..7) never receive a token
    scale = torch.tensor([3, 2, -2, -3, 0.5, 0, -0.5, 0.25])

    def tensors(name, rank):
        t = base(name, rank)
        if name.endswith("block_sparse_moe.gate.weight"):
            t = (scale[:, None] * t[0].float()[None]).bfloat16()
        return t

    path = write_checkpoint(tmp_path / "dead", cfg, tensors)
    ckpt = Checkpoint.open(path)
    tokens = torch.randint(0, 500, (4, 32), generator=torch.Generator().manual_seed(2))
    stats = list(collect(ckpt, tokens))
    per_layer = [s.expert_tokens(8) for s in stats]
    assert per_layer[0][4:] == [0, 0, 0, 0] and min(per_layer[0][:4]) > 0
    assert [(l, e) for l, e, _ in coverage_problems(per_layer, 1)] == [(0, 4), (0, 5), (0, 6), (0, 7)]
    entries = imatrix_entries(stats[0], 8)
    assert entries["blk.0.ffn_gate_exps.weight"][1][5] == 0
    assert torch.isfinite(entries["blk.0.ffn_gate_exps.weight"][0]).all()


# the CLI killed right after the N-th call of a LayerWork method: save_tensors (a layer's file written, its
# record not yet) or commit (the layer's record on disk)
KILLED_CALIBRATE = killed_cli.script()


def test_calibrate_resumes_after_kill_9_with_the_same_bytes(tiny_tp8, tmp_path, monkeypatch):
    """Killed after layer 0's file but before its record (nothing kept), after layer 0, then after layer 1,
    each run resuming the one before; the last re-run embeds nothing and writes the statistics and the imatrix
    of an uninterrupted run."""
    import subprocess
    import sys

    from grokquant.calibrate.statistics import calibrate
    from grokquant.data.documents import calibration_tokens
    from grokquant.grok.streaming import LayerStreamer
    from grokquant.grok.tokenizer import load_tokenizer

    args = ["calibrate", str(tiny_tp8), "-o", str(tmp_path / "s.safetensors"), "--imatrix",
            str(tmp_path / "i.gguf"), "--hessians", "--tokens", "256", "--seq-len", "64"]
    work = tmp_path / ".s.safetensors.partial"
    work_method = "grokquant.io.layer_work:LayerWork."
    for kill, layers_done in (((work_method + "save_tensors", "1"), 0), ((work_method + "commit", "1"), 1),
                              ((work_method + "commit", "1"), 2)):
        killed = subprocess.run([sys.executable, "-c", KILLED_CALIBRATE, *kill, *args], capture_output=True, text=True)
        assert killed.returncode == -9, killed.stderr[-2000:]
        assert not (tmp_path / "s.safetensors").exists()
        record = work / "progress.json"
        assert (json.loads(record.read_text())["done"] if record.exists() else 0) == layers_done

    tok = load_tokenizer(Checkpoint.open(tiny_tp8).tokenizer_path)
    tokens = calibration_tokens(tok, "builtin", 256, 64)

    def no_embedding(*a, **k):
        raise AssertionError("the resumed run embedded the tokens again")

    monkeypatch.setattr(LayerStreamer, "embed", no_embedding)
    calibrate(tiny_tp8, tmp_path / "s.safetensors", tokens, imatrix_out=tmp_path / "i.gguf", hessians=True,
              dataset="builtin", metadata={"seed": 0, "chat": False})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.gguf", "s.safetensors"]
    clean = tmp_path / "clean"
    clean.mkdir()
    done = subprocess.run([sys.executable, "-m", "grokquant", *args[:2], "-o", str(clean / "s.safetensors"),
                           "--imatrix", str(clean / "i.gguf"), *args[6:]], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("s.safetensors", "i.gguf"):
        assert (clean / name).read_bytes() == (tmp_path / name).read_bytes(), name
