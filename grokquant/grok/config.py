"""Grok 2 `config.json`: the model's hyper-parameters and the tensor names they imply."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from grokquant.errors import CheckpointError

# The release is tensor-parallel over 8 ranks; expert matrices are pre-sharded that way.
TP_RANKS = 8

# Keys without which the model's shapes or semantics are unknown.
REQUIRED_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
    "num_local_experts", "num_experts_per_tok", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "rope_theta",
    "embedding_multiplier_scale", "output_multiplier_scale", "final_logit_softcapping",
)

EXPERT_PROJS = ("w1", "w2", "w3")  # gate (gets GELU), down, up
# Dimension along which the 8 TP slices of each expert projection are concatenated.
EXPERT_MERGE_DIM = {"w1": 0, "w2": 1, "w3": 0}
# Tensors a config may imply: Grok 2 has 2,307; a corrupt layer or expert count must not make the inventory
# a billion names long.
MAX_TENSORS = 2**16
_KINDS = {"int": (int, "an integer"), "float": ((int, float), "a number"), "bool": (bool, "true or false"),
          "str": (str, "a string"), "list": (list, "a list")}


@dataclass
class GrokConfig:
    """Every key of the release's config.json. Defaults are the real model's values."""

    vocab_size: int = 131072
    hidden_size: int = 8192
    intermediate_size: int = 32768
    moe_intermediate_size: int = 16384
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    residual_moe: bool = True
    num_hidden_layers: int = 64
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 128
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    rope_theta: float = 208533496
    rope_type: str = "original"
    original_max_position_embeddings: int = 8192
    scaling_factor: float = 16.0
    extrapolation_factor: float = 1.0
    attn_factor: float = 1.0
    beta_fast: float = 8
    beta_slow: float = 1
    attn_temperature_len: int = 1024
    attn_logit_softcapping: float = 30.0
    router_logit_softcapping: float = 30.0
    final_logit_softcapping: float = 50
    embedding_multiplier_scale: float = 90.50966799187809
    output_multiplier_scale: float = 0.5
    sliding_window_size: int = -1
    global_attn_every_n: int = 1
    architectures: list = field(default_factory=lambda: ["Grok1ForCausalLM"])
    model_type: str = "git"
    torch_dtype: str = "bfloat16"

    # ---- loading -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "GrokConfig":
        missing = [k for k in REQUIRED_KEYS if k not in raw]
        if missing:
            raise CheckpointError(f"{source}: missing key(s) {', '.join(missing)}")
        known = {f.name: f for f in fields(cls)}
        kwargs = {}
        for key, value in raw.items():
            if key not in known:
                continue  # unknown keys are kept out; the release may carry extras
            kwargs[key] = value
        cfg = cls(**kwargs)
        heads = (cfg.hidden_size, cfg.num_attention_heads)
        if "head_dim" not in raw and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in heads):
            cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads  # else validate names the bad key
        cfg.validate(source)
        return cfg

    @classmethod
    def from_file(cls, path: Path) -> "GrokConfig":
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: config.json not found") from None
        except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8; absurdly nested brackets
            raise CheckpointError(f"{path}: not valid JSON ({str(exc)[:80]})") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path}: expected a JSON object")
        return cls.from_dict(raw, str(path))

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self, source: str = "config.json") -> None:
        def bad(msg):
            raise CheckpointError(f"{source}: {msg}")

        # every key of its annotated type: a config.json is untrusted, and "64" or null would fail much later
        for f in fields(self):
            value, (kind, words) = getattr(self, f.name), _KINDS[f.type]
            if not isinstance(value, kind) or isinstance(value, bool) != (f.type == "bool"):
                bad(f"{f.name} must be {words}, got {value!r:.40}")
            if f.type == "int" and not -(2**31) <= value < 2**31:  # GGUF metadata holds them as 32 bits
                bad(f"{f.name} {value} does not fit in 32 bits")
            if f.type == "float" and not math.isfinite(value):
                bad(f"{f.name} must be finite, got {value!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                     "num_local_experts", "num_experts_per_tok", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                bad(f"{name} must be a positive integer, got {value!r}")
        n_tensors = 3 + self.num_hidden_layers * (12 + 3 * self.num_local_experts)
        if n_tensors > MAX_TENSORS:
            bad(f"{self.num_hidden_layers} layers of {self.num_local_experts} experts are {n_tensors} tensors "
                f"(at most {MAX_TENSORS})")
        if self.num_experts_per_tok > self.num_local_experts:
            bad("num_experts_per_tok exceeds num_local_experts")
        if self.num_attention_heads % self.num_key_value_heads:
            bad("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            bad("head_dim must be even (RoPE rotates pairs)")
        if self.moe_intermediate_size % TP_RANKS:
            bad(f"moe_intermediate_size must split into {TP_RANKS} tensor-parallel slices")
        for name in ("rms_norm_eps", "rope_theta", "embedding_multiplier_scale",
                     "output_multiplier_scale"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                bad(f"{name} must be a positive number, got {value!r}")

    # ---- derived ---------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def layer_shapes(self, layer: int) -> dict[str, tuple[int, ...]]:
        """Full (merged) shape of every tensor of one decoder layer, keyed by release name."""
        H, D, M, E = self.hidden_size, self.intermediate_size, self.moe_intermediate_size, self.num_local_experts
        p = f"model.layers.{layer}."
        shapes = {
            p + "pre_attn_norm.weight": (H,),
            p + "post_attn_norm.weight": (H,),
            p + "pre_moe_norm.weight": (H,),
            p + "post_moe_norm.weight": (H,),
            p + "self_attn.q_proj.weight": (self.q_dim, H),
            p + "self_attn.k_proj.weight": (self.kv_dim, H),
            p + "self_attn.v_proj.weight": (self.kv_dim, H),
            p + "self_attn.o_proj.weight": (H, self.q_dim),
            p + "mlp.gate_proj.weight": (D, H),
            p + "mlp.up_proj.weight": (D, H),
            p + "mlp.down_proj.weight": (H, D),
            p + "block_sparse_moe.gate.weight": (E, H),
        }
        for e in range(E):
            shapes[expert_name(layer, e, "w1")] = (M, H)
            shapes[expert_name(layer, e, "w3")] = (M, H)
            shapes[expert_name(layer, e, "w2")] = (H, M)
        return shapes

    def global_shapes(self) -> dict[str, tuple[int, ...]]:
        V, H = self.vocab_size, self.hidden_size
        return {"model.embed_tokens.weight": (V, H), "lm_head.weight": (V, H), "model.norm.weight": (H,)}

    def all_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = self.global_shapes()
        for layer in range(self.num_hidden_layers):
            shapes.update(self.layer_shapes(layer))
        return shapes

    @property
    def rope_theta_f32(self) -> float:
        """The RoPE base as a float32 (what a GGUF stores and ggml computes with)."""
        import struct
        return struct.unpack("<f", struct.pack("<f", float(self.rope_theta)))[0]

    @property
    def attn_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)


def expert_name(layer: int, expert: int, proj: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{proj}.weight"


def parse_expert_name(name: str) -> tuple[int, int, str] | None:
    """(layer, expert, proj) for an expert tensor name, else None."""
    parts = name.split(".")
    if (len(parts) == 8 and parts[0] == "model" and parts[1] == "layers" and parts[3] == "block_sparse_moe"
            and parts[4] == "experts" and parts[6] in EXPERT_PROJS and parts[7] == "weight"
            and parts[2].isdigit() and parts[5].isdigit()):
        return int(parts[2]), int(parts[5]), parts[6]
    return None
