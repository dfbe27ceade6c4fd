"""Training throughput: tokens/s and model-FLOPs utilisation against the matmul peak measured in the same run.

    python benchmarks/train_throughput.py                       # CPU: mellum-tiny-cpu shape, fp32
    python benchmarks/train_throughput.py --device cuda         # GPU: mellum-tiny and the 4B shape, bf16
    python benchmarks/train_throughput.py --device cuda --model mellum-4b --layers 4 --seq-len 8192
    python benchmarks/train_throughput.py --device cuda --model mellum-4b --fp8   # bf16 row, then an fp8 row

MFU = achieved model FLOP/s ÷ peak FLOP/s, where model FLOPs per token = 6·N (parameters in matmuls, embedding
excluded) + 12·L·T·C (attention scores and values, PaLM appendix B; causal attention counted in full as is
conventional) and the peak is a large square matmul timed right before, in the run's precision (fp32 on CPU,
bf16 on GPU). The step is the real training step of mellum.train.pretrain (forward, losses, backward, Muon +
AdamW), on random tokens. `--fp8` measures each model twice, bf16 and then with the hidden linears converted by
the trainer's own torchao float8 conversion (`fp8=True` in a recipe); both rows' MFU is against the
same bf16 peak, so they compare directly (the fp8 matmul peak is about twice it).
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


def model_flops_per_token(model: Transformer, seq_len: int) -> float:
    config = model.config
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.ndim >= 2 and "embed_tokens" not in n)
    attention = 12 * config.num_layers * seq_len * config.num_heads * config.head_dim
    return 6 * matmul_params + attention


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _env(device: torch.device) -> DistEnv:
    return DistEnv(rank=0, world_size=1, local_rank=0, device=device)


def bench(name: str, model_config, seq_len: int, batch: int, steps: int, device: torch.device, compile: bool,
          fp8: bool = False) -> dict:
    torch.manual_seed(0)
    model = Transformer(model_config).to(device)
    if fp8:  # the trainer's order: to the device, float8 conversion, then compilation
        model = _float8(model, _env(device))
    if compile:
        for block in model.layers:
            block.compile()
    optimizers = build_optimizers(model, OptimConfig(lr=1e-3))
    weights = LossWeights.from_config(model_config)
    bf16 = device.type == "cuda"
    ids = torch.randint(0, model_config.vocab_size, (batch, seq_len + 1), device=device)
    data = {"input_ids": ids[:, :-1], "targets": ids[:, 1:]}
    num = float(batch * seq_len)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = pretraining_loss(model, data, weights, num, doc_masking=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up (and compilation)
        step()
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    elapsed = time.perf_counter() - t
    tokens_per_s = steps * batch * seq_len / elapsed
    flops = model_flops_per_token(model, seq_len) * tokens_per_s
    params = sum(p.numel() for p in model.parameters())
    precision = "fp8" if fp8 else ("bf16" if bf16 else "fp32")
    return {"model": name, "precision": precision, "params_M": round(params / 1e6, 1), "seq_len": seq_len,
            "batch": batch, "tokens_per_s": round(tokens_per_s), "model_tflops": round(flops / 1e12, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", action="append", help="recipe (mellum-tiny, mellum-tiny-cpu) or preset "
                        "(mellum-4b); default: mellum-tiny-cpu on CPU, mellum-tiny and mellum-4b on GPU")
    parser.add_argument("--layers", type=int, default=None, help="truncate preset models to this many layers "
                        "(the 4B shape's per-layer cost with fewer layers; default 4 for mellum-4b)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (GPU default: on)")
    parser.add_argument("--fp8", action="store_true", help="also measure each model with float8 hidden linears "
                        "(torchao, tensorwise scaling, as the trainer with fp8=True; needs an H100-class GPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU", file=sys.stderr)
        return 2
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
        try:
            recipe = get_recipe(name)
            config, seq_len, batch = recipe.model, recipe.seq_len, recipe.micro_batch
        except ValueError:
            config = get_config(name)
            config = config.replace(num_layers=args.layers or 4, max_position_embeddings=max(config.max_position_embeddings, 8192))
            seq_len, batch = 8192, 1
            name = f"{name} ({config.num_layers} layers)"
        if device.type == "cpu":
            seq_len, batch = min(seq_len, 256), min(batch, 4)
        seq_len, batch = args.seq_len or seq_len, args.batch or batch
        steps = args.steps or (20 if device.type == "cuda" else 3)
        for fp8 in (False, True) if args.fp8 else (False,):
            try:
                row = bench(name, config, seq_len, batch, steps, device, compile, fp8=fp8)
            except Exception as exc:  # noqa: BLE001 — one failed row (e.g. fp8 compilation) keeps the others
                traceback.print_exc()
                failed += 1
                row = {"model": name, "precision": "fp8" if fp8 else ("bf16" if device.type == "cuda" else "fp32"),
                       "error": f"{type(exc).__name__}: {exc}"[:500]}
            else:
                row["mfu"] = round(row["model_tflops"] * 1e12 / peak, 3)
            print(json.dumps(row), flush=True)  # as measured: a later crash keeps the earlier rows
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
