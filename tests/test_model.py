import math
from dataclasses import replace

import pytest
import torch

from grokquant.grok.checkpoint import Checkpoint
from grokquant.grok.config import GrokConfig
from grokquant.grok.model import PRESETS, Grok2ForCausalLM, KVCache, gelu, rope_cos_sin, yarn_corr_dims
from grokquant.grok.streaming import streamed_logits
from grokquant.runtime.generate import sample_iter


@pytest.fixture(scope="module")
def ckpt(tiny_tp8):
    return Checkpoint.open(tiny_tp8)


@pytest.fixture(scope="module")
def model(ckpt):
    return Grok2ForCausalLM.from_checkpoint(ckpt)


def naive_sglang(ckpt, tokens, temperature_len=None):
    """SGLang's forward pass (python/sglang/srt/models/grok.py) written out token by token in float64,
    independent of grokquant.model."""
    cfg = ckpt.config
    W = {n: ckpt.tensor(n).double() for n in ckpt.names()}
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    tlen = temperature_len or cfg.attn_temperature_len

    def rms(x, w):
        return x / math.sqrt((x * x).mean() + 1e-5) * w

    def rot(x, p):
        out = x.clone()
        for j in range(hd // 2):
            th = p * float(cfg.rope_theta) ** (-2 * j / hd)
            a, b = x[j], x[j + hd // 2]
            out[j], out[j + hd // 2] = a * math.cos(th) - b * math.sin(th), b * math.cos(th) + a * math.sin(th)
        return out

    def mlp(x, g, u, d):
        return d @ (torch.nn.functional.gelu(g @ x) * (u @ x))

    hs = [W["model.embed_tokens.weight"][t] * 90.50966799187809 for t in tokens]
    for L in range(cfg.num_hidden_layers):
        p = f"model.layers.{L}."
        ks, vs, new = [], [], []
        for pos, h in enumerate(hs):
            a = rms(h, W[p + "pre_attn_norm.weight"])
            q = (W[p + "self_attn.q_proj.weight"] @ a).view(nh, hd)
            k = (W[p + "self_attn.k_proj.weight"] @ a).view(nkv, hd)
            v = (W[p + "self_attn.v_proj.weight"] @ a).view(nkv, hd)
            ks.append(torch.stack([rot(k[i], pos) for i in range(nkv)]))
            vs.append(v)
            heads = []
            for i in range(nh):
                qi = rot(q[i], pos)
                kv = i // (nh // nkv)
                s = torch.stack([qi @ ks[j][kv] for j in range(pos + 1)]) / math.sqrt(hd)
                s = 30 * torch.tanh(s / 30)
                if pos > tlen:
                    s = s * math.log2(pos) / math.log2(tlen)
                w = torch.softmax(s, 0)
                heads.append(sum(w[j] * vs[j][kv] for j in range(pos + 1)))
            h = h + rms(W[p + "self_attn.o_proj.weight"] @ torch.cat(heads), W[p + "post_attn_norm.weight"])
            m = rms(h, W[p + "pre_moe_norm.weight"])
            r = 30 * torch.tanh((W[p + "block_sparse_moe.gate.weight"] @ m) / 30)
            P = torch.softmax(r, 0)
            top = torch.topk(P, cfg.num_experts_per_tok).indices
            moe = sum(P[e] * mlp(m, *(W[f"{p}block_sparse_moe.experts.{e}.{w}.weight"] for w in ("w1", "w3", "w2")))
                      for e in top.tolist())
            dense = mlp(m, W[p + "mlp.gate_proj.weight"], W[p + "mlp.up_proj.weight"], W[p + "mlp.down_proj.weight"])
            new.append(h + rms((dense + moe) / 1.4142135623730951, W[p + "post_moe_norm.weight"]))
        hs = new
    logits = torch.stack([W["lm_head.weight"] @ rms(h, W["model.norm.weight"]) * 0.5 for h in hs])
    return 50 * torch.tanh(logits / 50)


def test_matches_naive_reference(ckpt, model):
    tokens = torch.tensor([5, 77, 300, 12, 9, 401, 2, 33])
    ref = naive_sglang(ckpt, tokens.tolist())
    got = model(tokens)[0].double()
    assert (got - ref).abs().max() < 2e-4


def test_attention_temperature_applies_past_its_length(ckpt):
    cfg = replace(ckpt.config, attn_temperature_len=3)
    m = Grok2ForCausalLM.from_checkpoint(ckpt)
    m.cfg = cfg
    for layer in m.model.layers:
        layer.self_attn.cfg = cfg
    tokens = torch.tensor([5, 77, 300, 12, 9, 401])
    ref = naive_sglang(ckpt, tokens.tolist(), temperature_len=3)
    got = m(tokens)[0].double()
    assert (got - ref).abs().max() < 2e-4
    base = Grok2ForCausalLM.from_checkpoint(ckpt)(tokens)[0]
    assert torch.equal(got[:4].float(), base[:4])  # positions <= 3 untouched
    assert (got[4:].float() - base[4:]).abs().max() > 1e-3


def test_kv_cache_and_batch(model):
    tokens = torch.randint(0, 500, (3, 14), generator=torch.Generator().manual_seed(0))
    full = model(tokens)
    cache = KVCache(model.cfg.num_hidden_layers)
    parts = [model(tokens[:, :6], cache), model(tokens[:, 6:7], cache), model(tokens[:, 7:], cache)]
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-5
    for b in range(3):
        assert (model(tokens[b])[0] - full[b]).abs().max() < 1e-5


def test_merged_and_tp8_give_identical_logits(ckpt, tiny_merged):
    tokens = torch.arange(40).view(2, 20)
    a = Grok2ForCausalLM.from_checkpoint(ckpt)(tokens)
    b = Grok2ForCausalLM.from_checkpoint(Checkpoint.open(tiny_merged))(tokens)
    assert torch.equal(a, b)


def test_streamed_equals_resident(ckpt, model):
    tokens = torch.arange(30).view(2, 15)
    layers = []
    assert torch.equal(streamed_logits(ckpt, tokens, on_layer=layers.append), model(tokens))
    assert layers == list(range(ckpt.config.num_hidden_layers))


def test_llamacpp_switches(ckpt, model):
    x = torch.randn(64, ckpt.config.hidden_size)
    moe = model.model.layers[0].block_sparse_moe
    w_sgl, ids_sgl = moe.route(x, PRESETS["sglang"])
    w_cpp, ids_cpp = moe.route(x, PRESETS["llama.cpp"])
    assert torch.equal(ids_sgl, ids_cpp)  # selection is the same, only the mixing weights differ
    assert (w_sgl.sum(-1) < 1).all() and torch.allclose(w_cpp.sum(-1), torch.ones(64))
    tokens = torch.arange(12)
    cpp = Grok2ForCausalLM.from_checkpoint(ckpt, "llama.cpp")(tokens)
    assert 1e-3 < (cpp - model(tokens)).abs().max() < 1.0


def test_gelu_flavours():
    x = torch.linspace(-12, 12, 10001)
    assert (gelu(x, "erf") - gelu(x, "tanh")).abs().max() < 1e-3
    t16 = gelu(x, "tanh_f16")
    inside = x.abs() < 10
    assert torch.equal(t16[inside], t16[inside].half().float())  # values from an fp16 table
    assert (t16 - gelu(x, "tanh")).abs().max() < 1e-2
    assert t16[x <= -10].eq(0).all() and torch.equal(t16[x >= 10], x[x >= 10])


def test_rope_variants_for_real_config():
    cfg = GrokConfig()
    assert yarn_corr_dims(cfg) == (17, 24)  # llama.cpp's ggml_rope_yarn_corr_dims for the release config
    pos = torch.arange(0, 4096, 97)
    cos, sin = rope_cos_sin(pos, cfg, PRESETS["sglang"])
    ccos, csin = rope_cos_sin(pos, cfg, PRESETS["llama.cpp"])
    assert (cos - ccos).abs().max() < 1e-3 and (sin - csin).abs().max() < 1e-3
    ycos, ysin = rope_cos_sin(pos, cfg, PRESETS["llama.cpp-yarn"])
    mscale = 1 + 0.1 * math.log(16)
    assert torch.allclose(ycos ** 2 + ysin ** 2, torch.full_like(ycos, mscale ** 2), rtol=1e-5)
    assert torch.allclose(ycos[:, :17], ccos[:, :17] * mscale, atol=1e-3)  # low pairs keep their frequency
    assert not torch.allclose(ycos[:, 30:], ccos[:, 30:] * mscale, atol=1e-2)  # high pairs interpolated


def test_generate_is_greedy_and_stops(model):
    prompt = [10, 20, 30]
    out = list(sample_iter(model, prompt, 6))
    assert len(out) == 6
    seq = list(prompt)
    for tok in out:
        assert int(model(torch.tensor(seq))[0, -1].argmax()) == tok
        seq.append(tok)
    assert list(sample_iter(model, prompt, 6, stop_ids=(out[0],))) == []
