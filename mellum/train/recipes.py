"""Training recipes: functions returning a `TrainConfig`, from the published Mellum runs to CPU-sized ones.

A recipe is data (STYLE.md): variants derive from a base with `dataclasses.replace`. Numbers marked
"published" come from REFERENCE.md (Mellum-4B model card / Mellum 2 report); the rest are our choices, noted.
`apply_overrides(config, ["optim.lr=1e-3", "model.num_layers=4"])` changes any field by dotted path.
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from mellum.config import ModelConfig, get_config
from mellum.train.optim import OptimConfig
from mellum.train.schedule import BatchRamp, WSDSchedule


@dataclass(frozen=True)
class Phase:
    """One curriculum phase: train on `data` (a shard directory) until `until` of the run's progress (0–1]."""

    data: str
    until: float = 1.0


@dataclass
class TrainConfig:
    """Everything a pre-training run needs besides its output directory."""

    name: str
    model: ModelConfig
    data: str = "build/shards/train"  # shard directory (mellum data shards); overridden by `phases` when set
    eval_data: str | None = None  # held-out shard directory; None: no held-out evaluation
    tokenizer: str | None = None  # tokenizer directory copied next to the exported weights
    phases: tuple[Phase, ...] = ()  # curriculum (Mellum 2: three phases of different mixtures)
    seq_len: int = 128
    micro_batch: int = 4  # sequences per rank per forward/backward
    batch_ramp: BatchRamp = field(default_factory=lambda: BatchRamp(((0, 8),)))  # global batch, sequences
    max_steps: int = 100
    max_minutes: float | None = None  # wall-clock budget: training stops (and the LR decays) by then
    schedule: WSDSchedule = field(default_factory=lambda: WSDSchedule(warmup_steps=10, decay_fraction=0.2))
    optim: OptimConfig = field(default_factory=OptimConfig)
    seed: int = 0
    precision: str = "auto"  # "auto" (bf16 autocast on GPU, fp32 on CPU) | "fp32" | "bf16"
    fp8: bool = False  # torchao float8 tensorwise training of the hidden linears (H100-class GPUs)
    compile: bool = False  # torch.compile each transformer block
    doc_masking: bool = True  # attention and positions restart at every packed document
    eval_every: int = 50
    eval_batches: int = 8
    keep_best: bool = False  # keep a CPU copy of the weights with the lowest held-out loss; export those
    patience: int | None = None  # stop after this many evaluations in a row without a lower held-out loss
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    log_every: int = 1
    init_from: str | None = None  # Hugging Face model directory to start from (long-context stage, continued runs)
    # Parameter-name prefixes to train, everything else frozen (empty: train all). Weights under these prefixes may
    # be missing from `init_from` (freshly initialized): ("mtp.",) adds an MTP head to a finished model.
    train_only: tuple[str, ...] = ()
    export_dtype: str = "bfloat16"
    export_max_shard_mb: float | None = None

    def __post_init__(self) -> None:
        if self.seq_len > self.model.max_position_embeddings:
            raise ValueError(f"seq_len {self.seq_len} exceeds the model's max_position_embeddings "
                             f"{self.model.max_position_embeddings}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be positive (or None: no time budget), got {self.max_minutes}")
        if self.phases and abs(self.phases[-1].until - 1.0) > 1e-9:
            raise ValueError("the last curriculum phase must end at progress 1.0")
        # "train_only=mtp." on the command line is one prefix, not its characters
        self.train_only = (self.train_only,) if isinstance(self.train_only, str) else tuple(self.train_only)
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be at least 1 evaluation, got {self.patience}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- published recipes ------------------------------------------------------------------------------------
def mellum_4b() -> TrainConfig:
    """Mellum-4B (REFERENCE.md §1): Llama 4B, context 8192, ~4T tokens of permissive code, FIM on ~50% (SPM).

    Published: the shape and token count. Unconfirmed (not in the paper): optimizer settings and batch; we use the
    Mellum 2 recipe's (Muon + AdamW, WSD, 4,096 × 8,192-token global batch): 4T / 33.5M ≈ 120k steps.
    """
    return TrainConfig(
        name="mellum-4b", model=get_config("mellum-4b"), seq_len=8192, micro_batch=1,
        batch_ramp=BatchRamp(((0, 2048), (int(0.5e12), 4096))), max_steps=120_000,
        schedule=WSDSchedule(warmup_steps=2000, decay_fraction=0.1), optim=OptimConfig(lr=3e-4),
        precision="bf16", fp8=True, compile=True, doc_masking=True, eval_every=1000, checkpoint_every=1000,
        export_dtype="bfloat16", export_max_shard_mb=5000,
    )


def mellum2() -> TrainConfig:
    """Mellum 2 12B-A2.5B (REFERENCE.md §2): ~10.6T tokens in three phases, Muon (Moonlight) + AdamW, WSD with
    2,000 warm-up steps and linear decay to zero over phase 3, global batch 2,048 → 4,096 sequences of 8,192
    tokens, BF16 + FP8 tensorwise, global load balancing + router z-loss, MTP auxiliary loss.

    Published: all of the above. Unconfirmed: phase lengths (we split 10.6T as 6/3/1.6T), the peak LR, the
    z-loss coefficient and the point of the batch ramp. Phase data directories hold the mixtures 70/23/6,
    44/42/14 and 23/59/18 % web/code/math with FIM 50/10/50 % on code (built by `mellum data shards`).
    """
    model = get_config("mellum2-12b-a2.5b").replace(router_z_loss_coef=1e-3)
    tokens_per_step = 4096 * 8192
    return TrainConfig(
        name="mellum2", model=model, seq_len=8192, micro_batch=1,
        phases=(Phase("build/shards/phase1", 6.0 / 10.6), Phase("build/shards/phase2", 9.0 / 10.6),
                Phase("build/shards/phase3", 1.0)),
        batch_ramp=BatchRamp(((0, 2048), (int(1e12), 4096))), max_steps=int(10.6e12 / tokens_per_step),
        schedule=WSDSchedule(warmup_steps=2000, decay_fraction=1.6 / 10.6, final_factor=0.0),
        optim=OptimConfig(lr=4e-4, weight_decay=0.1), precision="bf16", fp8=True, compile=True,
        eval_every=1000, checkpoint_every=1000, export_max_shard_mb=5000,
    )


# ---- the bundled reference model ------------------------------------------------------------------------------
def mellum_tiny_model() -> ModelConfig:
    """Mellum-4B's shape scaled down: Llama, no GQA, untied head, SwiGLU at 2.69× width, RoPE 500k.

    23.2M parameters (12.6M of them embedding + head at vocabulary 16,384): 46 MB in bf16. The window is the
    length it is trained at (1,024): served at 2,048, positions it never saw raised the held-out NLL of repo-bench
    lines from 3.13 to 3.42 nats/token even without context (measured; `mellum-tiny-long` extends it with YaRN).
    """
    return ModelConfig(
        architecture="llama", vocab_size=16384, hidden_size=384, num_layers=6, num_heads=6, num_kv_heads=6,
        head_dim=64, intermediate_size=1024, max_position_embeddings=1024, rope_theta=500000.0,
        tie_word_embeddings=False, prompt_format="mellum", eos_token_id=0, bos_token_id=0,
    )


def mellum_tiny() -> TrainConfig:
    """The reference model on one GPU for a few minutes: context 1,024, 128k-token batches, WSD keyed to time.

    Data: `scripts/reference_model.sh prepare` or `gpu` (build/reference/). The LR decays over the last 25% of the
    wall-clock budget (`--max-minutes`), so the run ends annealed whenever the budget ends. The export holds the
    weights of the evaluation with the lowest held-out loss (`keep_best`: a few passes over a small corpus over-fit).
    """
    return TrainConfig(
        name="mellum-tiny", model=mellum_tiny_model(), data="build/reference/shards/train",
        eval_data="build/reference/shards/heldout", tokenizer="build/reference/tokenizer",
        seq_len=1024, micro_batch=32, batch_ramp=BatchRamp(((0, 64), (20_000_000, 128))), max_steps=20_000,
        schedule=WSDSchedule(warmup_steps=200, decay_fraction=0.25), optim=OptimConfig(lr=2e-3, weight_decay=0.1),
        precision="auto", compile=True, doc_masking=True, eval_every=250, eval_batches=16, keep_best=True,
        checkpoint_every=500, export_dtype="bfloat16", export_max_shard_mb=15,
    )


def mellum_tiny_cpu() -> TrainConfig:
    """The CPU fallback of the reference model: same pipeline and tokenizer, a smaller shape (8.1M parameters),
    context 256, 2,048-token steps (many small steps learn most from the few tokens a CPU sees in minutes)."""
    base = mellum_tiny()
    model = base.model.replace(hidden_size=192, num_layers=4, num_heads=3, num_kv_heads=3, intermediate_size=512)
    return dataclasses.replace(
        base, name="mellum-tiny-cpu", model=model, seq_len=256, micro_batch=8, batch_ramp=BatchRamp(((0, 8),)),
        max_steps=5000, schedule=WSDSchedule(warmup_steps=10, decay_fraction=0.3), optim=OptimConfig(lr=4e-3),
        precision="fp32", compile=False, eval_every=50, eval_batches=8, checkpoint_every=50,
    )


def mellum_tiny_long() -> TrainConfig:
    """Long-context extension of the reference model (Mellum 2 style): YaRN ×4 on full-attention layers, context
    4,096, continued from the exported model at a lower LR (short WSD with 10% warm-up)."""
    base = mellum_tiny()
    model = base.model.replace(
        max_position_embeddings=4096,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                      "beta_fast": 32.0, "beta_slow": 1.0},
    )
    return dataclasses.replace(
        base, name="mellum-tiny-long", model=model, seq_len=4096, micro_batch=8, batch_ramp=BatchRamp(((0, 32),)),
        max_steps=500, schedule=WSDSchedule(warmup_steps=50, decay_fraction=0.3),
        optim=dataclasses.replace(base.optim, lr=1e-3), init_from="runs/mellum-tiny/model",
    )


def mellum_tiny_mtp() -> TrainConfig:
    """An MTP head for the bundled reference model, the model itself frozen: Mellum 2's draft layer (DeepSeek-V3
    §2.2, arXiv:2412.19437: one block predicting token t+2 from h_t and the embedding of token t+1), trained on the
    reference data so speculative decoding can be measured with trained weights. Only the head's 2.1M parameters
    learn (the trunk runs forward only), so a CPU trains it in minutes: `scripts/reference_model.sh mtp-cpu`."""
    base = mellum_tiny()
    return dataclasses.replace(
        base, name="mellum-tiny-mtp", model=base.model.replace(num_mtp_layers=1), init_from="mellum/assets/mellum-tiny",
        train_only=("mtp.",), seq_len=512, micro_batch=8, batch_ramp=BatchRamp(((0, 8),)), max_steps=2000,
        schedule=WSDSchedule(warmup_steps=20, decay_fraction=0.3), optim=OptimConfig(lr=2e-3, weight_decay=0.0),
        precision="fp32", compile=False, eval_every=50, eval_batches=8, checkpoint_every=50,
    )


# ---- tiny recipes for tests and this CPU --------------------------------------------------------------------
def tiny_cpu() -> TrainConfig:
    """Seconds on a CPU: the tiny-dense preset, context 64, batches of 8 sequences."""
    return TrainConfig(
        name="tiny-cpu", model=get_config("tiny-dense"), seq_len=64, micro_batch=4, batch_ramp=BatchRamp(((0, 8),)),
        max_steps=40, schedule=WSDSchedule(warmup_steps=5, decay_fraction=0.3), optim=OptimConfig(lr=1e-2),
        precision="fp32", eval_every=20, eval_batches=4, checkpoint_every=10, export_dtype="float32",
    )


def tiny_moe_cpu() -> TrainConfig:
    """The tiny Mellum 2 (sliding + full layers, MoE, MTP) with router z-loss: exercises every loss term."""
    model = get_config("tiny-moe").replace(router_z_loss_coef=1e-3)
    return dataclasses.replace(tiny_cpu(), name="tiny-moe-cpu", model=model)


def tiny_long_cpu() -> TrainConfig:
    """Long-context stage in miniature: tiny-dense with YaRN ×2 at twice the context."""
    base = tiny_cpu()
    model = base.model.replace(rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64,
                                             "beta_fast": 32.0, "beta_slow": 1.0})
    return dataclasses.replace(base, name="tiny-long-cpu", model=model, seq_len=128, micro_batch=2,
                               batch_ramp=BatchRamp(((0, 4),)), max_steps=10)


RECIPES: dict[str, Callable[[], TrainConfig]] = {
    "mellum-4b": mellum_4b,
    "mellum2": mellum2,
    "mellum-tiny": mellum_tiny,
    "mellum-tiny-cpu": mellum_tiny_cpu,
    "mellum-tiny-long": mellum_tiny_long,
    "mellum-tiny-mtp": mellum_tiny_mtp,
    "tiny-cpu": tiny_cpu,
    "tiny-moe-cpu": tiny_moe_cpu,
    "tiny-long-cpu": tiny_long_cpu,
}


def get_recipe(name: str, overrides: list[str] = ()) -> TrainConfig:
    """A recipe by exact name with `key=value` overrides applied."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    return apply_overrides(RECIPES[name](), overrides)


def apply_overrides(config, overrides) -> TrainConfig:
    """Set fields by dotted path ("optim.lr=1e-3", "model.num_layers=4", "max_minutes=8"); values are Python
    literals (numbers, strings, tuples, None) or bare strings. All changes to one nested config are applied
    together, so interdependent fields (num_heads with num_kv_heads) are validated as a whole."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        node = tree
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key!r} conflicts with another override")
        node[leaf] = (_literal(raw.strip()), key.strip())
    return _apply(config, tree)


def _apply(obj, tree: dict):
    names = {f.name for f in dataclasses.fields(obj)}
    changes = {}
    for name, value in tree.items():
        if name not in names:
            full = value[1] if isinstance(value, tuple) else name
            raise ValueError(f"unknown setting {full!r} ({name!r} is not one of: {', '.join(sorted(names))})")
        if isinstance(value, dict):
            child = getattr(obj, name)
            if not dataclasses.is_dataclass(child):
                raise ValueError(f"setting {name!r} has no fields to set")
            changes[name] = _apply(child, value)
            continue
        value = value[0]
        if name == "batch_ramp" and isinstance(value, int):
            value = BatchRamp(((0, value),))
        elif name == "phases":
            value = tuple(Phase(*p) if isinstance(p, (tuple, list)) else Phase(p) for p in value)
        changes[name] = value
    if isinstance(obj, ModelConfig):  # a new num_layers resizes the per-layer patterns (ModelConfig.replace)
        return obj.replace(**changes)
    return dataclasses.replace(obj, **changes)


def _literal(raw: str):
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw
