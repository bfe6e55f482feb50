"""A readable PyTorch Grok 2, with switchable semantics.

Module names mirror the release's tensor names, so `state_dict()` keys are checkpoint names.
Two presets (SGLang's `grok.py` and llama.cpp's `LLM_ARCH_GROK` graph):
- `sglang`: the reference runtime: router softcap 30, raw top-2 softmax weights, attention
  temperature for positions > 1024, erf GELU, plain NeoX RoPE, (dense + MoE) / sqrt(2).
- `llama.cpp`: what llama.cpp computes from our GGUF: no router softcap, renormalised top-2,
  no temperature, tanh GELU through ggml's fp16 table, RoPE angles accumulated in float32 as
  ggml does (`llama.cpp-yarn` adds YaRN and its magnitude factor, for GGUFs that declare it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from grokquant.grok.config import GrokConfig, parse_expert_name
from grokquant.io.memory import release_freed_memory


@dataclass(frozen=True)
class Semantics:
    name: str = "sglang"
    router_softcap: bool = True
    renormalize_topk: bool = False
    attn_temperature: bool = True
    gelu: str = "erf"  # "erf", "tanh", or "tanh_f16" (ggml's fp16 lookup table)
    rope: str = "plain"  # "plain" or "yarn"
    rope_ggml: bool = False  # angles by float32 cumulative product, as ggml computes them
    residual_scale: float = 1 / 1.4142135623730951
    rms_norm_ggml: bool = False  # the sum of squares in double and 1/sqrtf, as ggml orders it


PRESETS = {
    "sglang": Semantics(),
    "llama.cpp": Semantics("llama.cpp", router_softcap=False, renormalize_topk=True, attn_temperature=False,
                           gelu="tanh_f16", rope="plain", rope_ggml=True, residual_scale=math.sqrt(2) / 2,
                           rms_norm_ggml=True),
}
PRESETS["llama.cpp-yarn"] = replace(PRESETS["llama.cpp"], name="llama.cpp-yarn", rope="yarn")


def semantics(name: str | Semantics) -> Semantics:
    if isinstance(name, Semantics):
        return name
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown semantics {name!r} (choose from {', '.join(PRESETS)})") from None


# ---- elementwise pieces ---------------------------------------------------------------------------

def gelu(x: torch.Tensor, flavour: str) -> torch.Tensor:
    if flavour == "erf":
        return F.gelu(x)
    if flavour == "tanh":
        return F.gelu(x, approximate="tanh")
    if flavour == "tanh_f16":  # ggml CPU: table of fp16 results indexed by the fp16-rounded input
        xf = x.float()
        table = ggml_gelu_table().to(xf.device)
        y = table[xf.half().view(torch.int16).long() & 0xFFFF]
        y = torch.where(xf <= -10, torch.zeros_like(xf), torch.where(xf >= 10, xf, y))
        return y.to(x.dtype)
    raise ValueError(f"unknown GELU flavour {flavour!r}")


@functools.cache
def ggml_gelu_table() -> torch.Tensor:
    """ggml_table_gelu_f16 as ggml-cpu builds it: fp16(0.5f*x*(1.0f + tanhf(SQRT_2_OVER_PI*x*(1.0f +
    GELU_COEF_A*x*x)))) for every fp16 x, in float32 in that order, with the C library's tanhf and the
    fused multiply-add that GCC contracts `1.0f + GELU_COEF_A*x*x` into on FMA builds (ggml.c's
    ggml_gelu_f32). Torch's own tanh GELU lands on another fp16 value in 26 of the 65536 entries."""
    x = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    with np.errstate(all="ignore"):
        ax = np.float32(0.044715) * x
        fused = (ax.astype(np.float64) * x + 1.0).astype(np.float32)  # fmaf(ax, x, 1): the product is exact
        inner = np.float32(0.7978845608028654) * x * fused
        y = np.float32(0.5) * x * (np.float32(1.0) + _tanhf(inner))
    return torch.from_numpy(y.astype(np.float16).astype(np.float32))


def _tanhf(x: np.ndarray) -> np.ndarray:
    """The C library's tanhf, element by element (65536 calls, once): numpy's float32 tanh is its own."""
    try:
        libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    except OSError:  # no C library to ask: numpy's tanh, within an ulp of it
        return np.tanh(x)
    tanhf = libm.tanhf
    tanhf.restype, tanhf.argtypes = ctypes.c_float, [ctypes.c_float]
    return np.array([tanhf(v) for v in x.tolist()], dtype=np.float32)


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return cap * torch.tanh(x / cap)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    ggml_order = False  # set from Semantics.rms_norm_ggml by the model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.ggml_order:  # ggml_compute_forward_rms_norm_f32, then a separate multiply by the weight
            mean = ((xf * xf).double().sum(-1, keepdim=True) / xf.shape[-1]).float()
            eps = torch.tensor(self.eps, dtype=torch.float32)  # a float op param: added in float32
            # sqrtf and 1.0f/ each correctly rounded: through double (torch's float32 sqrt is not, always)
            root = torch.sqrt((mean + eps).double()).float()
            y = xf * (1.0 / root.double()).float()
        else:
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


# ---- RoPE --------------------------------------------------------------------------------------------

def rope_cos_sin(positions: torch.Tensor, cfg: GrokConfig, sem: Semantics) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every (position, pair) angle, [T, head_dim/2] float32, magnitude included."""
    half = cfg.head_dim // 2
    pos = positions.to(torch.float32)
    if not sem.rope_ggml:  # SGLang: inverse frequencies in float32, angle = p * inv_freq
        inv_freq = 1.0 / (float(cfg.rope_theta) ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
        theta = pos[:, None] * inv_freq[None, :]
        return theta.cos(), theta.sin()

    # ggml: theta_j = p * theta_scale^j by repeated float32 multiplication
    theta_scale = torch.tensor(cfg.rope_theta_f32, dtype=torch.float32).pow(-2.0 / cfg.head_dim)
    cols = [pos]
    for _ in range(1, half):
        cols.append(cols[-1] * theta_scale)
    theta = torch.stack(cols, dim=1)
    mscale = 1.0
    if sem.rope == "yarn":
        freq_scale = 1.0 / cfg.scaling_factor
        low, high = yarn_corr_dims(cfg)
        j = torch.arange(half, dtype=torch.float32)
        ramp = 1 - ((j - low) / max(0.001, high - low)).clamp(0, 1)
        mix = ramp * cfg.extrapolation_factor
        theta = (theta * freq_scale) * (1 - mix) + theta * mix
        mscale = cfg.attn_factor * (1.0 + 0.1 * math.log(1.0 / freq_scale))
    return theta.cos() * mscale, theta.sin() * mscale


def yarn_corr_dims(cfg: GrokConfig) -> tuple[float, float]:
    def corr_dim(beta: float) -> float:
        return cfg.head_dim * math.log(cfg.original_max_position_embeddings / (beta * 2 * math.pi)) / (
            2 * math.log(cfg.rope_theta_f32))

    low = max(0.0, math.floor(corr_dim(cfg.beta_fast)))
    high = min(cfg.head_dim - 1.0, math.ceil(corr_dim(cfg.beta_slow)))
    return low, high


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX layout: pair (j, j + head_dim/2). x: [B, heads, T, head_dim]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


# ---- layers ---------------------------------------------------------------------------------------

class KVCache:
    """Keys and values per layer, [B, kv_heads, T, head_dim], grown as tokens arrive."""

    def __init__(self, n_layers: int):
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k[layer] is not None:
            k = torch.cat([self.k[layer], k], dim=2)
            v = torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, cfg: GrokConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden_size
        self.q_proj = nn.Linear(H, cfg.q_dim, bias=False)
        self.k_proj = nn.Linear(H, cfg.kv_dim, bias=False)
        self.v_proj = nn.Linear(H, cfg.kv_dim, bias=False)
        self.o_proj = nn.Linear(cfg.q_dim, H, bias=False)

    def forward(self, x, positions, cos, sin, cache: KVCache | None, layer: int, sem: Semantics):
        cfg = self.cfg
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)

        scores = softcap(q.float() @ k.float().transpose(-1, -2) * cfg.attn_scale, cfg.attn_logit_softcapping)
        if sem.attn_temperature:
            p = positions.to(torch.float64)
            tau = torch.where(p > cfg.attn_temperature_len,
                              torch.log2(p.clamp(min=1)) / math.log2(cfg.attn_temperature_len), torch.ones_like(p))
            scores = scores * tau.to(torch.float32)[:, None]
        key_pos = torch.arange(k.shape[2], device=x.device)
        scores = scores.masked_fill(key_pos[None, :] > positions[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = (probs @ v.float()).to(x.dtype)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, cfg.q_dim))


class GatedMLP(nn.Module):
    """GELU(x W_gate) * (x W_up) -> W_down; used for the dense MLP and (as w1/w3/w2) each expert."""

    def __init__(self, hidden: int, inner: int, names=("gate_proj", "up_proj", "down_proj")):
        super().__init__()
        self.names = names
        setattr(self, names[0], nn.Linear(hidden, inner, bias=False))
        setattr(self, names[1], nn.Linear(hidden, inner, bias=False))
        setattr(self, names[2], nn.Linear(inner, hidden, bias=False))

    def forward(self, x: torch.Tensor, flavour: str) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(gelu(gate(x), flavour) * up(x))


class SparseMoE(nn.Module):
    def __init__(self, cfg: GrokConfig):
        super().__init__()
        self.cfg = cfg
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_local_experts, bias=False)
        self.experts = nn.ModuleList(GatedMLP(cfg.hidden_size, cfg.moe_intermediate_size, ("w1", "w3", "w2"))
                                     for _ in range(cfg.num_local_experts))

    def route(self, x: torch.Tensor, sem: Semantics) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [N, k], expert ids [N, k]) for flattened tokens x [N, H]; router in fp32."""
        logits = F.linear(x.float(), self.gate.weight.float())
        if sem.router_softcap:
            logits = softcap(logits, self.cfg.router_logit_softcapping)
        probs = torch.softmax(logits, dim=-1)
        weights, ids = torch.topk(probs, self.cfg.num_experts_per_tok, dim=-1)
        if sem.renormalize_topk:
            weights = weights / weights.sum(-1, keepdim=True).clamp(min=6.103515625e-5)
        return weights, ids

    def forward(self, x: torch.Tensor, sem: Semantics) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, ids = self.route(x, sem)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in range(len(self.experts)):
            self.add_expert(e, x, weights, ids, sem, out)
        return out.to(x.dtype).view(shape)

    def add_expert(self, e: int, x, weights, ids, sem: Semantics, out: torch.Tensor | None) -> None:
        """Expert e on the tokens of x [N, H] routed to it, weighted into out [N, H] (float32; None: only run)."""
        token, slot = torch.nonzero(ids == e, as_tuple=True)
        if token.numel() == 0:
            return
        y = self.experts[e](x[token], sem.gelu).float()
        if out is not None:
            out.index_add_(0, token, y * weights[token, slot, None])


class DecoderLayer(nn.Module):
    def __init__(self, cfg: GrokConfig):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.pre_attn_norm = RMSNorm(H, eps)
        self.self_attn = Attention(cfg)
        self.post_attn_norm = RMSNorm(H, eps)
        self.pre_moe_norm = RMSNorm(H, eps)
        self.block_sparse_moe = SparseMoE(cfg)
        self.mlp = GatedMLP(H, cfg.intermediate_size)
        self.post_moe_norm = RMSNorm(H, eps)

    def forward(self, h, positions, cos, sin, cache, layer: int, sem: Semantics):
        h, m = self.attend(h, positions, cos, sin, cache, layer, sem)
        return self.finish(h, self.mlp(m, sem.gelu), self.block_sparse_moe(m, sem), sem)

    # the forward pass in parts, for passes that visit the experts one group at a time
    def attend(self, h, positions, cos, sin, cache, layer: int, sem: Semantics):
        """(h after the attention residual, the MLP/MoE input m)."""
        h = h + self.post_attn_norm(self.self_attn(self.pre_attn_norm(h), positions, cos, sin, cache, layer, sem))
        return h, self.pre_moe_norm(h)

    def finish(self, h, dense, moe, sem: Semantics):
        return h + self.post_moe_norm((dense + moe) * sem.residual_scale)


class Grok2Model(nn.Module):
    def __init__(self, cfg: GrokConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Grok2ForCausalLM(nn.Module):
    def __init__(self, cfg: GrokConfig, sem: Semantics | str = "sglang"):
        super().__init__()
        self.cfg = cfg
        self.sem = semantics(sem)
        self.model = Grok2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        for p in self.parameters():
            p.requires_grad_(False)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.ggml_order = self.sem.rms_norm_ggml

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def empty(cls, cfg: GrokConfig, sem: Semantics | str = "sglang") -> "Grok2ForCausalLM":
        """A model on the meta device: no memory until weights are assigned."""
        with torch.device("meta"):
            return cls(cfg, sem)

    @classmethod
    def from_checkpoint(cls, ckpt, sem: Semantics | str = "sglang", dtype=torch.float32,
                        device="cpu") -> "Grok2ForCausalLM":
        model = cls.empty(ckpt.config, sem)
        model.load_globals(ckpt.tensor, dtype, device)
        for layer in range(ckpt.config.num_hidden_layers):
            model.load_layer(layer, ckpt.tensor, dtype, device)
        return model

    def load_globals(self, get: Callable[[str], torch.Tensor], dtype=torch.float32, device="cpu") -> None:
        self.assign({n: get(n) for n in self.cfg.global_shapes()}, dtype, device)

    def load_layer(self, layer: int, get: Callable[[str], torch.Tensor], dtype=torch.float32, device="cpu",
                   names: Iterable[str] | None = None) -> None:
        """Assign layer `layer`'s weights (or only `names`) from get(release_name)."""
        prefix = f"model.layers.{layer}."
        module = self.model.layers[layer]
        for name in names if names is not None else self.cfg.layer_shapes(layer):  # one tensor at a time
            local = name[len(prefix):]
            param = module.get_parameter(local)
            if param.device.type != "meta" and param.dtype == dtype:
                param.copy_(get(name))  # storage recycled from another layer
            else:
                self.assign({local: get(name)}, dtype, device, module)

    def dense_part(self, layer: int) -> list[str]:
        """Release names of a layer's attention, norms, router and dense MLP."""
        return [n for n in self.cfg.layer_shapes(layer) if not parse_expert_name(n)]

    def unload_layer(self, layer: int) -> None:
        """Hand a layer's memory back (its parameters return to the meta device)."""
        self.model.layers[layer].to("meta")
        release_freed_memory()

    def assign(self, tensors: dict[str, torch.Tensor], dtype=torch.float32, device="cpu",
               module: nn.Module | None = None) -> None:
        """Set parameters of the model (or of `module`, by names relative to it) from `tensors`."""
        module = self if module is None else module
        params = dict(module.named_parameters())
        for name, t in tensors.items():
            if name not in params:
                continue  # global names for a layer module, or vice versa
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            if tuple(t.shape) != tuple(params[name].shape):
                raise ValueError(f"{name}: shape {list(t.shape)}, model expects {list(params[name].shape)}")
            setattr(owner, attr, nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=False))

    # ---- forward -------------------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(tokens) * self.cfg.embedding_multiplier_scale

    def positions(self, T: int, cache: KVCache | None, device) -> torch.Tensor:
        start = cache.length if cache is not None else 0
        return torch.arange(start, start + T, device=device)

    def run_layer(self, layer: int, h, positions, cache: KVCache | None = None, rope=None) -> torch.Tensor:
        cos, sin = rope if rope is not None else rope_cos_sin(positions, self.cfg, self.sem)
        return self.model.layers[layer](h, positions, cos.to(h.device), sin.to(h.device), cache, layer, self.sem)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.model.norm(h)).float() * self.cfg.output_multiplier_scale
        if self.cfg.final_logit_softcapping:
            logits = softcap(logits, float(self.cfg.final_logit_softcapping))
        return logits

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, vocab] (float32). With a cache, continues after it."""
        if tokens.dim() == 1:
            tokens = tokens[None]
        positions = self.positions(tokens.shape[1], cache, tokens.device)
        rope = rope_cos_sin(positions, self.cfg, self.sem)
        h = self.embed(tokens)
        for layer in range(self.cfg.num_hidden_layers):
            h = self.run_layer(layer, h, positions, cache, rope)
        if cache is not None:
            cache.length += tokens.shape[1]
        return self.head(h)

