import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from grokquant.grok.checkpoint import Checkpoint
from grokquant.cli import main
from grokquant.evaluate.train import FIXTURE_MODEL, TrainConfig, init_model, model_config, train

FIXTURE = Path(__file__).parent / "data" / "grok2-trained"
DOCS = Path(__file__).parent.parent / "docs" / "quality.md"
QUICK = TrainConfig(steps=12, batch_size=4, seq_len=64, warmup=2, lr=3e-3)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "quick"
    return out, train(out, "builtin", QUICK, heldout_limit=4096)


def test_every_row_fits_k_quants():
    cfg = model_config()
    for name, shape in cfg.all_shapes().items():
        assert len(shape) == 1 or shape[-1] % 256 == 0, name
    assert (cfg.num_local_experts, cfg.num_experts_per_tok) == (8, 2) and cfg.residual_moe
    assert cfg.embedding_multiplier_scale == 16.0  # sqrt(hidden), as Grok 2's sqrt(8192)


def test_quick_training_writes_the_release_layout(quick):
    out, result = quick
    ckpt = Checkpoint.open(out)
    assert ckpt.layout == "tp8" and ckpt.config.hidden_size == FIXTURE_MODEL["hidden_size"]
    assert len(list(out.glob("pytorch_model-*-TP-*.safetensors"))) == 39
    assert all(e.dtype == "BF16" for s in ckpt.entries.values() for e in s.values())
    record = json.loads((out / "training.json").read_text())
    assert record["train"]["steps"] == 12 and len(record["losses"]) == 12
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < first - 0.5  # learning, from ln(512) ≈ 6.2
    assert result.heldout_ppl < result.unigram_ppl * 1.5 and len(result.expert_share) == 2


def test_training_is_deterministic(quick, tmp_path):
    out, _ = quick
    again = tmp_path / "again"
    train(again, "builtin", QUICK, heldout_limit=4096)
    a, b = Checkpoint.open(out), Checkpoint.open(again)
    for name in ("lm_head.weight", "model.layers.1.block_sparse_moe.experts.3.w2.weight",
                 "model.layers.0.block_sparse_moe.gate.weight"):
        assert torch.equal(a.tensor(name), b.tensor(name)), name


def test_router_is_trained(quick):
    out, result = quick
    ckpt = Checkpoint.open(out)
    start = init_model(ckpt.config, QUICK.seed).model.layers[0].block_sparse_moe.gate.weight.detach()
    trained = ckpt.tensor("model.layers.0.block_sparse_moe.gate.weight").float()
    assert (trained - start).abs().max() > 1e-3  # gradients reach the router through the top-k weights
    assert all(min(share) > 0 for share in result.expert_share)


def test_cli_trains_on_a_text_file(tmp_path):
    text = tmp_path / "zen.txt"
    import this  # noqa: F401  (the Zen of Python, a text every Python has)
    import codecs

    zen = codecs.decode(this.s, "rot13")
    text.write_text("\n\n".join([zen] * 30))
    r = CliRunner().invoke(main, ["synth", str(tmp_path / "z"), "--train", str(text), "--steps", "3", "--layers", "1"])
    assert r.exit_code == 0, r.output
    assert "held-out perplexity" in r.output and Checkpoint.open(tmp_path / "z").config.num_hidden_layers == 1
    r = CliRunner().invoke(main, ["synth", str(tmp_path / "y"), "--steps", "3"])
    assert r.exit_code == 2 and r.output.startswith("error: --steps needs --train")
    r = CliRunner().invoke(main, ["synth", str(tmp_path / "y"), "--train", str(tmp_path / "missing.txt")])
    assert r.exit_code == 2 and r.output.startswith("error:")


def test_fixture_record_matches_the_documented_command():
    record = json.loads((FIXTURE / "training.json").read_text())
    command = re.search(r"^grokquant synth tests/data/grok2-trained .*$", DOCS.read_text(), re.M)[0]
    args = shlex.split(command)
    assert "--train" in args and args[args.index("--train") + 1] == record["train"]["text"]
    steps = int(args[args.index("--steps") + 1]) if "--steps" in args else TrainConfig().steps
    assert record["train"] == {**json.loads(json.dumps(TrainConfig().__dict__)), "steps": steps,
                               "text": record["train"]["text"]}
    assert record["heldout_ppl"] < record["unigram_ppl"] / 3


@pytest.mark.slow
def test_retraining_reproduces_the_fixture(tmp_path):
    record = json.loads((FIXTURE / "training.json").read_text())
    tc = TrainConfig(**{k: v for k, v in record["train"].items() if k != "text"})
    result = train(tmp_path / "again", record["train"]["text"], tc)
    assert result.heldout_ppl == pytest.approx(record["heldout_ppl"], rel=0.02)
