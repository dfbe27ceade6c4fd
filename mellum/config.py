"""Model configuration: one flat dataclass for Mellum-4B (dense Llama) and Mellum 2 (MoE), named presets, HF config.json.

Per-layer structure is data: `layer_types` ("full_attention" / "sliding_attention") and `mlp_types`
("dense" / "sparse"), one entry per layer. Behaviour never depends on a model's name or path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ARCHITECTURES = ("llama", "mellum")
LAYER_TYPES = ("full_attention", "sliding_attention")
MLP_TYPES = ("dense", "sparse")
# Hugging Face class name per architecture (config.json "architectures").
HF_CLASSES = {"llama": "LlamaForCausalLM", "mellum": "MellumForCausalLM"}
# Our own fields that Hugging Face configs have no name for; stored in config.json under these keys.
_EXTRA_KEYS = {
    "prompt_format": "mellum_prompt_format",
    "router_z_loss_coef": "mellum_router_z_loss_coef",
    "mtp_loss_weight": "mellum_mtp_loss_weight",
}


@dataclass
class ModelConfig:
    """Everything that decides a model's shape and numerics. Derived fields are filled in `__post_init__`."""

    architecture: str = "llama"  # "llama" (Mellum-4B) | "mellum" (Mellum 2)
    vocab_size: int = 98304
    hidden_size: int = 3072
    num_layers: int = 30
    num_heads: int = 24
    num_kv_heads: int | None = None  # None: same as num_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_heads
    intermediate_size: int = 8256  # dense SwiGLU MLP width
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    rope_theta: float = 500000.0  # full-attention layers
    rope_theta_sliding: float | None = None  # sliding-window layers; None: same as rope_theta
    layer_types: tuple[str, ...] | None = None  # None: all "full_attention"
    sliding_window: int | None = None  # keys with q_pos - k_pos < sliding_window are visible
    mlp_types: tuple[str, ...] | None = None  # None: all "dense"
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3 attention)
    tie_word_embeddings: bool = False
    # YaRN (arXiv:2309.00071) on full-attention layers only: {"factor", "original_max_position_embeddings",
    # "beta_fast", "beta_slow"} (optional "attention_factor", "truncate"). None: plain RoPE.
    rope_scaling: dict[str, Any] | None = None
    num_mtp_layers: int = 0  # multi-token prediction layers (Mellum 2 has one; at most one supported)
    mtp_layer_type: str | None = None  # None: "sliding_attention" if the model has sliding layers (HF default)
    mtp_mlp_type: str | None = None  # None: "sparse" if the model has experts (HF default), else "dense"
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.0
    mtp_loss_weight: float = 0.3
    prompt_format: str = "mellum"
    eos_token_id: int = 0
    bos_token_id: int | None = 0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unsupported architecture {self.architecture!r}; expected one of {ARCHITECTURES}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; set head_dim")
            self.head_dim = self.hidden_size // self.num_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.rope_theta_sliding is None:
            self.rope_theta_sliding = self.rope_theta
        self.layer_types = tuple(self.layer_types) if self.layer_types is not None else ("full_attention",) * self.num_layers
        self.mlp_types = tuple(self.mlp_types) if self.mlp_types is not None else ("dense",) * self.num_layers
        self._check_pattern("layer_types", self.layer_types, LAYER_TYPES)
        self._check_pattern("mlp_types", self.mlp_types, MLP_TYPES)
        for name in ("layer_types", "mlp_types"):  # one entry per layer: index num_layers is the MTP layer's
            if len(getattr(self, name)) != self.num_layers:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {self.num_layers} layers")
        if self.num_mtp_layers not in (0, 1):
            raise ValueError(f"num_mtp_layers must be 0 or 1, got {self.num_mtp_layers}")
        if self.mtp_layer_type is None:
            self.mtp_layer_type = "sliding_attention" if "sliding_attention" in self.layer_types else "full_attention"
        if self.mtp_mlp_type is None:
            self.mtp_mlp_type = "sparse" if self.num_experts > 0 else "dense"
        if self.mtp_layer_type not in LAYER_TYPES:
            raise ValueError(f"mtp_layer_type must be one of {LAYER_TYPES}, got {self.mtp_layer_type!r}")
        if self.mtp_mlp_type not in MLP_TYPES:
            raise ValueError(f"mtp_mlp_type must be one of {MLP_TYPES}, got {self.mtp_mlp_type!r}")
        uses_sliding = "sliding_attention" in self.all_layer_types
        if uses_sliding and (self.sliding_window is None or self.sliding_window <= 0):
            raise ValueError("layer_types has sliding_attention layers but sliding_window is not a positive integer")
        if "sparse" in self.all_mlp_types:
            if self.num_experts <= 0 or self.moe_intermediate_size <= 0:
                raise ValueError("sparse MLP layers need num_experts > 0 and moe_intermediate_size > 0")
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ValueError(
                    f"num_experts_per_tok must be in 1..num_experts ({self.num_experts}), got {self.num_experts_per_tok}"
                )
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
            for key in ("factor", "original_max_position_embeddings"):
                if key not in self.rope_scaling:
                    raise ValueError(f"rope_scaling (YaRN) needs {key!r}; got keys {sorted(self.rope_scaling)}")
            self.rope_scaling.setdefault("beta_fast", 32.0)
            self.rope_scaling.setdefault("beta_slow", 1.0)
        if self.architecture == "llama":
            # Llama checkpoints have no place for these; refuse rather than write a config transformers misreads.
            # An MTP head is the exception: a full-attention dense block under mtp.* that LlamaForCausalLM ignores
            # (the config key and the tensors), added to a finished model as a speculative draft.
            if uses_sliding or "sparse" in self.all_mlp_types or self.qk_norm:
                raise ValueError(
                    "architecture 'llama' supports only full attention, dense MLPs and no QK-norm; "
                    "use architecture 'mellum'"
                )
        if self.architecture == "mellum" and not self.qk_norm:
            raise ValueError("architecture 'mellum' always has QK-norm (qk_norm=True)")

    @staticmethod
    def _check_pattern(name: str, pattern: tuple[str, ...], allowed: tuple[str, ...]) -> None:
        bad = [p for p in pattern if p not in allowed]
        if bad:
            raise ValueError(f"{name} has unknown entries {sorted(set(bad))}; allowed: {allowed}")

    def __setattr__(self, name, value):  # keep the per-layer patterns hashable and immutable
        if name in ("layer_types", "mlp_types") and isinstance(value, list):
            value = tuple(value)
        object.__setattr__(self, name, value)

    # ---- derived views --------------------------------------------------------------------------------
    @property
    def all_layer_types(self) -> tuple[str, ...]:
        """Attention type of every layer, MTP layer included (it has layer index `num_layers`)."""
        return self.layer_types + (self.mtp_layer_type,) * self.num_mtp_layers

    @property
    def all_mlp_types(self) -> tuple[str, ...]:
        return self.mlp_types + (self.mtp_mlp_type,) * self.num_mtp_layers

    def window(self, layer_idx: int) -> int | None:
        """Attention window of a layer (None = full causal attention)."""
        return self.sliding_window if self.all_layer_types[layer_idx] == "sliding_attention" else None

    def replace(self, **changes) -> "ModelConfig":
        """A copy with `changes`. A new `num_layers` without new patterns keeps the first layers of the current
        patterns (a shallower model of the same design), or repeats a uniform pattern to more layers."""
        layers = changes.get("num_layers", self.num_layers)
        for name in ("layer_types", "mlp_types"):
            pattern = getattr(self, name)
            if name in changes or len(pattern) == layers:
                continue
            if len(pattern) < layers and len(set(pattern)) > 1:
                raise ValueError(f"num_layers={layers}: the {name} pattern {pattern} cannot be extended; give "
                                 f"{name} of {layers} entries as well")
            changes[name] = pattern[:layers] if len(pattern) > layers else pattern[:1] * layers
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- Hugging Face config.json ---------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Read a `LlamaForCausalLM` or `MellumForCausalLM` config.json dict."""
        if not isinstance(hf, dict):
            raise ValueError(f"config.json holds a {type(hf).__name__}, not a JSON object")
        arch_names = hf.get("architectures") or []
        model_type = hf.get("model_type")
        if "MellumForCausalLM" in arch_names or model_type == "mellum":
            architecture = "mellum"
        elif "LlamaForCausalLM" in arch_names or model_type == "llama":
            architecture = "llama"
        else:
            raise ValueError(
                f"unsupported model architecture {arch_names or model_type!r}: "
                "mellum reads LlamaForCausalLM (Mellum-4B) and MellumForCausalLM (Mellum 2) checkpoints"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}: only SwiGLU (silu) MLPs are implemented")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ValueError(f"unsupported config: {flag}=true (the implemented models have no biases)")
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        bad = [k for k in required if type(hf.get(k)) is not int]
        if bad:
            got = ", ".join(f"{k}={hf[k]!r}" if k in hf else f"{k} (missing)" for k in bad)
            raise ValueError(f"config.json needs integer values for {got}")
        num_layers = hf["num_hidden_layers"]
        kw: dict[str, Any] = dict(
            architecture=architecture,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=num_layers,
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 8192),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            eos_token_id=_first_id(hf.get("eos_token_id"), 0),
            bos_token_id=_first_id(hf.get("bos_token_id"), None),
            init_std=hf.get("initializer_range", 0.02),
        )
        for ours, key in _EXTRA_KEYS.items():
            if key in hf:
                kw[ours] = hf[key]
        if architecture == "llama":
            params = hf.get("rope_parameters")
            if params is None:  # transformers 4 layout: rope_theta + rope_scaling
                params = dict(hf.get("rope_scaling") or {})
                params.setdefault("rope_type", params.pop("type", "default"))
            # A top-level rope_theta fills in for one rope_parameters leaves out, as transformers'
            # standardize_rope_params does (modeling_rope_utils.py).
            kw["rope_theta"] = params.get("rope_theta") or hf.get("rope_theta") or 10000.0
            kw["rope_scaling"] = _yarn_from_hf(params, "rope_parameters")
            kw["num_mtp_layers"] = hf.get("num_nextn_predict_layers") or 0
            return cls(**kw)
        # Mellum 2: rope parameters keyed by layer type, per-layer patterns, experts, MTP.
        layer_types = tuple(hf.get("layer_types") or ("full_attention",) * num_layers)
        rope = hf.get("rope_parameters") or {
            "full_attention": {"rope_type": "default", "rope_theta": 500000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        }
        # MellumRotaryEmbedding reads rope_parameters[layer type]["rope_theta"] for every layer type in use, rotating
        # the whole head: a flat dict, a missing base or a partial rotation is refused, never replaced by a default.
        if not isinstance(rope, dict) or set(rope) - set(LAYER_TYPES):
            raise ValueError(f"unsupported config: Mellum rope_parameters must be keyed by layer type {LAYER_TYPES}, "
                             f"got {sorted(rope) if isinstance(rope, dict) else rope!r}")
        used = set(layer_types) | set(hf.get("mtp_layer_types") or ())
        for layer_type, params in rope.items():
            if params is None:
                continue
            if layer_type in used and params.get("rope_theta") is None:
                raise ValueError(f"config.json: rope_parameters.{layer_type} has no rope_theta")
            if params.get("partial_rotary_factor", 1.0) != 1.0:
                raise ValueError(f"unsupported config: rope_parameters.{layer_type}.partial_rotary_factor="
                                 f"{params['partial_rotary_factor']} (only whole-head rotation is implemented)")
        full = rope.get("full_attention") or {"rope_type": "default", "rope_theta": 500000.0}
        sliding = rope.get("sliding_attention") or {"rope_type": "default", "rope_theta": 10000.0}
        if _yarn_from_hf(sliding, "rope_parameters.sliding_attention") is not None:
            raise ValueError("unsupported config: YaRN on sliding_attention layers (only full-attention layers are scaled)")
        num_mtp = hf.get("num_mtp_layers", hf.get("num_nextn_predict_layers")) or 0
        mtp_types = hf.get("mtp_layer_types") or [None]
        mtp_mlp = hf.get("mtp_mlp_layer_types") or [None]
        kw.update(
            rope_theta=full.get("rope_theta", 500000.0),
            rope_theta_sliding=sliding.get("rope_theta", 10000.0),
            rope_scaling=_yarn_from_hf(full, "rope_parameters.full_attention"),
            layer_types=layer_types,
            sliding_window=hf.get("sliding_window"),
            mlp_types=tuple(hf.get("mlp_layer_types") or ("sparse",) * num_layers),
            num_experts=hf.get("num_experts", hf.get("num_local_experts", 0)),
            num_experts_per_tok=hf.get("num_experts_per_tok", 0),
            moe_intermediate_size=hf.get("moe_intermediate_size", 0),
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            qk_norm=True,
            num_mtp_layers=num_mtp,
            mtp_layer_type=mtp_types[0] if num_mtp else None,
            mtp_mlp_type=mtp_mlp[0] if num_mtp else None,
            router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
        )
        return cls(**kw)

    def to_hf_config(self, dtype: str = "float32") -> dict[str, Any]:
        """The config.json dict transformers 5 reads for `LlamaForCausalLM` / `MellumForCausalLM`."""
        hf: dict[str, Any] = {
            "architectures": [HF_CLASSES[self.architecture]],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "initializer_range": self.init_std,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "dtype": dtype,
        }
        full_rope = {"rope_type": "default", "rope_theta": float(self.rope_theta)}
        if self.rope_scaling is not None:
            full_rope = {**{k: v for k, v in self.rope_scaling.items()}, "rope_type": "yarn", "rope_theta": float(self.rope_theta)}
        if self.architecture == "llama":
            hf.update(mlp_bias=False, rope_parameters=full_rope)
            if self.num_mtp_layers:
                hf.update(num_nextn_predict_layers=self.num_mtp_layers)
        else:
            hf.update(
                rope_parameters={
                    "full_attention": full_rope,
                    "sliding_attention": {"rope_type": "default", "rope_theta": float(self.rope_theta_sliding)},
                },
                layer_types=list(self.layer_types),
                mlp_layer_types=list(self.mlp_types),
                sliding_window=self.sliding_window,
                num_experts=self.num_experts,
                num_experts_per_tok=self.num_experts_per_tok,
                moe_intermediate_size=self.moe_intermediate_size,
                norm_topk_prob=self.norm_topk_prob,
                router_aux_loss_coef=self.router_aux_loss_coef,
            )
            if self.num_mtp_layers:
                hf.update(
                    num_nextn_predict_layers=self.num_mtp_layers,
                    mtp_layer_types=[self.mtp_layer_type],
                    mtp_mlp_layer_types=[self.mtp_mlp_type],
                )
        for ours, key in _EXTRA_KEYS.items():
            hf[key] = getattr(self, ours)
        return hf


def _first_id(value, default):
    if value is None:
        return default
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else default
    return int(value)


def _yarn_from_hf(params: dict[str, Any], where: str) -> dict[str, Any] | None:
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return None
    if rope_type != "yarn":
        raise ValueError(f"unsupported RoPE type {rope_type!r} in {where}: only 'default' and 'yarn' are implemented")
    keep = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "attention_factor", "truncate")
    out = {k: params[k] for k in keep if params.get(k) is not None}
    if "mscale" in params or "mscale_all_dim" in params:
        raise ValueError(f"unsupported YaRN options mscale/mscale_all_dim in {where}")
    return out


# ---- presets ----------------------------------------------------------------------------------------------
def _mellum2_layer_types(n: int) -> tuple[str, ...]:
    # REFERENCE.md §2: three sliding-window layers, then one full-attention layer, repeating.
    return tuple("full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(n))


PRESETS: dict[str, ModelConfig] = {
    # Mellum-4B: JetBrains/Mellum-4b-base config.json (LlamaForCausalLM), REFERENCE.md §1. Vocabulary 98,304 rows
    # as in the public GGUF conversion; a real checkpoint's config.json always wins (load_pretrained reads it).
    "mellum-4b": ModelConfig(
        architecture="llama", vocab_size=98304, hidden_size=3072, num_layers=30, num_heads=24, num_kv_heads=24,
        head_dim=128, intermediate_size=8256, rms_norm_eps=1e-6, max_position_embeddings=8192, rope_theta=500000.0,
        tie_word_embeddings=False, eos_token_id=0, bos_token_id=0,
    ),
    # Mellum 2 12B-A2.5B: defaults of transformers 5 `MellumConfig` and REFERENCE.md §2. The MLP pattern (first layer
    # dense, the rest sparse, DeepSeek-V3 style) is UNCONFIRMED: the real config.json's mlp_layer_types wins on load.
    "mellum2-12b-a2.5b": ModelConfig(
        architecture="mellum", vocab_size=98304, hidden_size=2304, num_layers=28, num_heads=32, num_kv_heads=4,
        head_dim=128, intermediate_size=7168, rms_norm_eps=1e-6, max_position_embeddings=131072,
        rope_theta=500000.0, rope_theta_sliding=10000.0, layer_types=_mellum2_layer_types(28), sliding_window=1024,
        mlp_types=("dense",) + ("sparse",) * 27, num_experts=64, num_experts_per_tok=8, moe_intermediate_size=896,
        norm_topk_prob=True, qk_norm=True, tie_word_embeddings=False, num_mtp_layers=1, router_aux_loss_coef=0.001,
        eos_token_id=0, bos_token_id=0,
    ),
    # Tiny presets for tests (build + forward in milliseconds on CPU). Vocabulary 1,024 matches the test tokenizer.
    "tiny-dense": ModelConfig(
        architecture="llama", vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=128, max_position_embeddings=512, rope_theta=10000.0,
    ),
    # A miniature Mellum 2: sliding + full layers, dense + sparse MLPs, GQA, QK-norm, split rope bases, window 16, MTP.
    "tiny-moe": ModelConfig(
        architecture="mellum", vocab_size=1024, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
        head_dim=16, intermediate_size=128, max_position_embeddings=512, rope_theta=500000.0,
        rope_theta_sliding=10000.0, layer_types=_mellum2_layer_types(4), sliding_window=16,
        mlp_types=("dense", "sparse", "sparse", "sparse"), num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, norm_topk_prob=True, qk_norm=True, num_mtp_layers=1,
    ),
}


def get_config(name: str) -> ModelConfig:
    """A fresh copy of a named preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])
