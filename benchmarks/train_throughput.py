"""Training throughput: tokens/s and model-FLOPs utilisation against the matmul peak measured in the same run.

    python benchmarks/train_throughput.py                       # CPU: mellum-tiny-cpu shape, fp32
    python benchmarks/train_throughput.py --device cuda         # GPU: mellum-tiny and the whole Mellum-4B, bf16
    python benchmarks/train_throughput.py --device cuda --model mellum-4b --layers 4   # the 4B shape, 4 layers
    python benchmarks/train_throughput.py --device cuda --model mellum-4b --fp8   # bf16 row, then an fp8 row
    python benchmarks/train_throughput.py --device cuda --model mellum-4b --accum 1,8   # one row per accumulation

MFU = achieved model FLOP/s ÷ peak FLOP/s, where model FLOPs per token = 6·N (parameters in matmuls, embedding
excluded, an MoE layer's experts at top-k of E: the active ones; the MTP layer and a second output-head pass when
the MTP loss runs) + 12·L·T·C (attention scores and values, PaLM appendix B, T capped at the window in
sliding-window layers; causal attention counted in full as is conventional; `mfu_causal` counts it at half, the
work a causal kernel does) and the peak is a large square matmul timed right before, in the run's precision (fp32
on CPU, bf16 on GPU). The step is the real training step of mellum.train.pretrain (forward, losses, backward, Muon +
AdamW), on random tokens. One optimizer step takes `--accum` micro-batches (gradient accumulation): the recipes'
global batch is thousands of 8k-token sequences, so on any real number of GPUs the optimizer step (Muon's
Newton–Schulz iterations on every hidden matrix) is shared by many forward/backward passes; the GPU default of 8
micro-batches is what 256 GPUs give for Mellum-4B's 2,048-sequence batch. Each row also splits the time of one
optimizer step into forward/backward and the optimizer. `--fp8` measures each model twice, bf16 and then with the
hidden linears converted by the trainer's own torchao float8 conversion (`fp8=True` in a recipe); both rows' MFU is
against the same bf16 peak, so they compare directly (the fp8 matmul peak is about twice it).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mellum.config import get_config  # noqa: E402
from mellum.model import Transformer  # noqa: E402
from mellum.train.distributed import DistEnv  # noqa: E402
from mellum.train.losses import LossWeights, pretraining_loss  # noqa: E402
from mellum.train.optim import OptimConfig, build_optimizers  # noqa: E402
from mellum.train.pretrain import _float8  # noqa: E402  (the trainer's fp8 conversion, reused as is)
from mellum.train.recipes import get_recipe  # noqa: E402


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, seconds: float = 2.0) -> float:
    """FLOP/s of an n×n×n matmul, best of repeated timings."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        _sync(device)
        t = time.perf_counter()
        for _ in range(4):
            a @ b
        _sync(device)
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t))
    return best


def model_flops_per_token(model: Transformer, seq_len: int, causal: bool = False, mtp: bool = False) -> float:
    """6·N + 12·H·D·Σ_layers K (PaLM appendix B), K the keys one query attends to: `seq_len` in a full-attention
    layer, at most the window in a sliding-window one (Mellum 2: 3 of 4 layers, where counting the whole sequence
    would overstate the work several times over at 8k tokens); `causal` counts only the keys at or before the query
    (half of them in a full layer), the work a causal kernel does.

    N counts a token's active matmul parameters: an MoE layer's experts at top-k of E, the ones a token runs through,
    and the output head even when it is tied to the embedding. With `mtp` (the MTP loss runs) the MTP layer and its
    second pass through the shared output head count too; without it the MTP weights sit idle and are not counted.
    """
    config = model.config
    active = config.num_experts_per_tok / config.num_experts if config.num_experts else 1.0

    def matmul_params(prefix: str) -> float:  # 2-D weights under `prefix`, experts at top-k of E
        return sum(p.numel() * (active if ".experts." in n else 1.0) for n, p in model.named_parameters()
                   if p.ndim >= 2 and n.startswith(prefix))

    head = model.lm_head.weight.numel()  # [V, C], once per pass through it
    params = matmul_params("layers.") + head
    layers = list(range(config.num_layers))
    if mtp and config.num_mtp_layers:
        params += matmul_params("mtp.") + head
        layers.append(config.num_layers)  # the MTP layer's attention (layer index num_layers)
    keys = 0.0
    for i in layers:
        span = min(seq_len, config.window(i) or seq_len)  # keys a query can see
        keys += span - span * span / (2 * seq_len) if causal else span  # causal: the mean over queries (T/2 if full)
    return 6 * params + 12 * keys * config.num_heads * config.head_dim


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _env(device: torch.device) -> DistEnv:
    return DistEnv(rank=0, world_size=1, local_rank=0, device=device)


def bench(name: str, model_config, seq_len: int, batch: int, steps: int, device: torch.device, compile: bool,
          peak: float, fp8: bool = False, accum: int = 1) -> dict:
    """Time `steps` optimizer steps of `accum` micro-batches each, after two warm-up steps (and compilation)."""
    torch.manual_seed(0)
    model = Transformer(model_config).to(device)
    if fp8:  # the trainer's order: to the device, float8 conversion, then compilation
        model = _float8(model, _env(device))
    if compile:
        for block in model.layers:
            block.compile()
    optimizers = build_optimizers(model, OptimConfig(lr=1e-3))
    weights = LossWeights.from_config(model_config)
    mtp = bool(weights.mtp)  # the MTP layer runs only when its loss has a weight
    bf16 = device.type == "cuda"
    ids = torch.randint(0, model_config.vocab_size, (batch, seq_len + 1), device=device)
    data = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}
    num = float(batch * seq_len * accum)

    def step() -> tuple[float, float]:  # seconds of forward/backward and of the optimizer
        t = time.perf_counter()
        for _ in range(accum):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss, _ = pretraining_loss(model, data, weights, num, doc_masking=False)
            loss.backward()
        _sync(device)
        middle = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        return middle - t, time.perf_counter() - middle

    for _ in range(2):  # warm-up (and compilation)
        step()
    fwd_bwd = optimizer = 0.0
    for _ in range(steps):
        a, b = step()
        fwd_bwd, optimizer = fwd_bwd + a, optimizer + b
    tokens_per_s = steps * accum * batch * seq_len / (fwd_bwd + optimizer)
    flops = model_flops_per_token(model, seq_len, mtp=mtp) * tokens_per_s
    causal_flops = model_flops_per_token(model, seq_len, causal=True, mtp=mtp) * tokens_per_s
    params = sum(p.numel() for p in model.parameters())
    precision = "fp8" if fp8 else ("bf16" if bf16 else "fp32")
    return {"model": name, "precision": precision, "params_M": round(params / 1e6, 1), "seq_len": seq_len,
            "batch": batch, "accum": accum, "tokens_per_s": round(tokens_per_s),
            "model_tflops": round(flops / 1e12, 3), "fwd_bwd_s": round(fwd_bwd / steps, 3),
            "optimizer_s": round(optimizer / steps, 3),
            # from the unrounded FLOP/s: on a CPU model_tflops is a few thousandths, too coarse to divide
            "mfu": round(flops / peak, 3), "mfu_causal": round(causal_flops / peak, 3)}


MAX_DEFAULT_ACCUM = 8  # Mellum-4B's 2,048-sequence batch over 256 GPUs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", action="append", help="recipe (mellum-tiny, mellum-tiny-cpu, mellum-4b) or preset "
                        "(e.g. mellum2-12b-a2.5b); default: mellum-tiny-cpu on CPU, mellum-tiny and mellum-4b on GPU")
    parser.add_argument("--layers", type=int, default=None, help="truncate the model to this many layers (the "
                        "shape's per-layer cost on a smaller device; default: whole recipes, 4 layers of a preset "
                        "that is not a recipe)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="sequences per micro-batch")
    parser.add_argument("--accum", default=None, help="micro-batches per optimizer step, or a comma-separated list "
                        "(one row each); default: the recipe's accumulation on one device, at most "
                        f"{MAX_DEFAULT_ACCUM}; 1 on CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default: 20 micro-batches' "
                        "worth on GPU, at least 3; 3 on CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (GPU default: on)")
    parser.add_argument("--fp8", action="store_true", help="also measure each model with float8 hidden linears "
                        "(torchao, tensorwise scaling, as the trainer with fp8=True; needs an H100-class GPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU", file=sys.stderr)
        return 2
    try:
        accums = [int(a) for a in args.accum.split(",")] if args.accum else None
    except ValueError:
        parser.error(f"--accum takes whole numbers, e.g. 8 or 1,8: {args.accum!r}")
    if accums is not None and min(accums) < 1:
        parser.error(f"--accum must be at least 1: {args.accum!r}")
    for option in ("layers", "seq_len", "batch", "steps"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1: {getattr(args, option)}")
    if args.fp8:  # fail before measuring anything, with the trainer's message (no CUDA, no torchao)
        try:
            _float8(torch.nn.Sequential(), _env(device))
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak(device, dtype, 8192 if device.type == "cuda" else 1024)
    names = args.model or (["mellum-tiny", "mellum-4b"] if device.type == "cuda" else ["mellum-tiny-cpu"])
    compile = args.compile or device.type == "cuda"
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
          f"matmul peak measured {peak / 1e12:.3f} TFLOP/s ({str(dtype).split('.')[-1]})", flush=True)
    failed = 0
    for name in names:
        layers = args.layers
        try:
            recipe = get_recipe(name)
            config, seq_len, batch = recipe.model, recipe.seq_len, recipe.micro_batch
            default_accum = min(MAX_DEFAULT_ACCUM, max(1, recipe.batch_ramp.stages[0][1] // batch))
        except ValueError:
            config, seq_len, batch, default_accum = get_config(name), 8192, 1, MAX_DEFAULT_ACCUM
            layers = layers or 4
        if layers and layers != config.num_layers:
            config = config.replace(num_layers=layers)
            name = f"{name} ({layers} layers)"
        if device.type == "cpu":
            seq_len, batch, default_accum = min(seq_len, 256), min(batch, 4), 1
        seq_len, batch = args.seq_len or seq_len, args.batch or batch
        config = config.replace(max_position_embeddings=max(config.max_position_embeddings, seq_len))
        for accum in accums or [default_accum]:
            steps = args.steps or (max(3, -(-20 // accum)) if device.type == "cuda" else 3)
            for fp8 in (False, True) if args.fp8 else (False,):
                try:
                    row = bench(name, config, seq_len, batch, steps, device, compile, peak, fp8=fp8, accum=accum)
                except Exception as exc:  # noqa: BLE001 — one failed row (e.g. fp8 compilation) keeps the others
                    traceback.print_exc()
                    failed += 1
                    row = {"model": name, "precision": "fp8" if fp8 else ("bf16" if device.type == "cuda" else "fp32"),
                           "accum": accum, "error": f"{type(exc).__name__}: {exc}"[:500]}
                print(json.dumps(row), flush=True)  # as measured: a later crash keeps the earlier rows
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
