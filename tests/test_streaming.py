"""The layer-streaming engine: a layer in parts equals the whole layer, hooks see each part, and what a
hook pushes through the weights is not counted as calibration."""

import torch

from grokquant.calibrate.statistics import Collector, LayerStats
from grokquant.grok.checkpoint import Checkpoint
from grokquant.grok.model import Grok2ForCausalLM
from grokquant.grok.streaming import LayerStreamer


def streamed_layer0(ckpt, tokens, **kwargs):
    model = Grok2ForCausalLM.empty(ckpt.config)
    streamer = LayerStreamer(model, ckpt.tensor, tokens.shape[1])
    hidden = streamer.embed(tokens, 2)
    stats = LayerStats(0, with_hessians=True)
    collector = Collector(model.model.layers[0], stats, hessians=True)
    try:
        out = streamer.run(0, hidden, collector=collector, **kwargs)
    finally:
        collector.remove()
    return out, stats, model


def test_groups_and_hooks(tiny_tp8):
    ckpt = Checkpoint.open(tiny_tp8)
    tokens = torch.randint(0, ckpt.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    reference, ref_stats, _ = streamed_layer0(ckpt, tokens)
    full = Grok2ForCausalLM.from_checkpoint(ckpt)
    h = full.embed(tokens)
    # the whole layer on the whole batch (bit-identity is test_model.py's, on one batch)
    assert torch.allclose(torch.cat(reference), full.run_layer(0, h, torch.arange(16)), atol=1e-5)

    seen = []

    def on_dense(layer, batches):
        seen.append(("dense", layer, len(batches)))

    def on_experts(layer, experts, batches):
        seen.append(("experts", experts.start, experts.stop))
        expert = model_ref[0].model.layers[0].block_sparse_moe.experts[experts.start]
        m = torch.cat([b.x for b in batches])
        expert.w2(expert.w1(m) * expert.w3(m))  # e.g. all-token statistics of an under-covered expert

    model_ref = []
    model = Grok2ForCausalLM.empty(ckpt.config)
    model_ref.append(model)
    streamer = LayerStreamer(model, ckpt.tensor, 16)
    stats = LayerStats(0, with_hessians=True)
    collector = Collector(model.model.layers[0], stats, hessians=True)
    out = streamer.run(0, streamer.embed(tokens, 2), [(0, 3), (3, 8)], collector, on_dense, on_experts)
    collector.remove()
    assert seen == [("dense", 0, 2), ("experts", 0, 3), ("experts", 3, 8)]
    assert all(torch.equal(a, b) for a, b in zip(out, reference))  # expert groups change nothing
    assert stats.count == ref_stats.count  # the hooks' own passes were not counted
    for g in ref_stats.hessian:
        assert torch.equal(stats.hessian[g], ref_stats.hessian[g]), g


def test_replay_takes_the_outputs_from_the_hooks_weights(tiny_tp8):
    ckpt = Checkpoint.open(tiny_tp8)
    tokens = torch.randint(0, ckpt.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    reference, ref_stats, _ = streamed_layer0(ckpt, tokens)

    def same(layer, *args):
        return ckpt.tensor

    out, stats, _ = streamed_layer0(ckpt, tokens, on_dense=same, on_experts=same, replay=True)
    assert all(torch.equal(a, b) for a, b in zip(out, reference)) and stats.count == ref_stats.count

    def halved(layer, *args):
        return lambda name: ckpt.tensor(name) * 0.5 if ".experts." in name else ckpt.tensor(name)

    out, stats, _ = streamed_layer0(ckpt, tokens, on_dense=same, on_experts=halved, replay=True)
    assert not torch.equal(torch.cat(out), torch.cat(reference))
    assert stats.count == ref_stats.count  # statistics still come from the original weights
    for g in ref_stats.sum2:
        assert torch.equal(stats.sum2[g], ref_stats.sum2[g]), g
