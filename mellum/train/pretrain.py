"""The pre-training loop: packed FIM/code shards → model → losses → Muon/AdamW steps, with exact resume and export.

Run as `mellum train pretrain --recipe NAME` or `python -m mellum.train.pretrain --recipe NAME` (also under
`torchrun --nproc-per-node N`). One optimizer step = the recipe's global batch, split into micro-batches of
`micro_batch` sequences per rank (gradient accumulation; the batch ramp changes the count). The LR follows
Warmup-Hold-Decay over the run's progress — steps, or wall-clock time when `max_minutes` is set. Checkpoints
hold everything the next step depends on; the finished model is exported in the Hugging Face format — with
`keep_best`, the weights of the evaluation with the lowest held-out loss; `patience` stops a run that no longer
improves.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mellum.train import checkpointing
from mellum.train.distributed import DistEnv, all_reduce_sum, barrier, init_distributed, shard_model, shutdown
from mellum.train.losses import IGNORE, LossWeights, pretraining_loss, valid_targets
from mellum.train.metrics import Metrics
from mellum.train.optim import build_optimizers, set_lr_factor
from mellum.train.recipes import RECIPES, TrainConfig, get_recipe
from mellum.train.schedule import Progress


BEST_FILE = "best_model.pt"  # the best weights inside a checkpoint directory (runs with keep_best)
# Settings a resumed run may change: budgets, logging, evaluation cadence, export and where files live. Any other
# difference from the checkpoint's config (model, batch, schedule, optimizer, seed, ...) refuses the resume.
RESUMABLE_CHANGES = ("name", "data", "eval_data", "tokenizer", "phases", "max_steps", "max_minutes", "patience",
                     "eval_every", "checkpoint_every", "keep_checkpoints", "log_every", "compile", "init_from",
                     "export_dtype", "export_max_shard_mb")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Best:
    """The evaluation with the lowest held-out loss so far, and how many evaluations have come since."""

    step: int | None = None
    loss: float = math.inf
    stale: int = 0  # evaluations in a row without a lower loss (patience counts these)
    state: dict | None = None  # its weights on the CPU (keep_best; rank 0 only under FSDP)

    def state_dict(self) -> dict:
        return {"step": self.step, "loss": self.loss, "stale": self.stale}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.loss, self.stale = state["step"], float(state["loss"]), int(state["stale"])


class Trainer:
    """One pre-training run: builds model, optimizers and data from a `TrainConfig` and steps until done."""

    def __init__(self, config: TrainConfig, out_dir: str | os.PathLike, env: DistEnv, bar: bool = True):
        self.config, self.env = config, env
        self.out = Path(out_dir)
        seed_everything(config.seed)  # same initial weights on every rank
        self.model = self._build_model()
        self.weights = LossWeights.from_config(config.model)
        self.optimizers = build_optimizers(self.model, config.optim)
        self.progress = Progress(config.max_steps, config.max_minutes * 60 if config.max_minutes else None)
        self.phase = -1
        self.loader = None
        self.best = Best()
        self.last_eval: tuple[int, float] | None = None  # (step, held-out loss) of the latest evaluation
        self.last_losses: dict[str, float] | None = None  # its parts (evaluate_losses)
        self.bar = bar
        self.autocast = self._autocast_context()

    # ---- construction ---------------------------------------------------------------------------------
    def _build_model(self) -> torch.nn.Module:
        from mellum.model import Transformer

        cfg, env = self.config, self.env
        model = Transformer(cfg.model)
        if cfg.init_from:
            self._load_initial_weights(model, cfg.init_from)
        if cfg.train_only:
            trained = [name for name, p in model.named_parameters() if p.requires_grad_(self._trains(name)).requires_grad]
            if not trained:
                raise ValueError(f"train_only {list(cfg.train_only)} matches no parameter of the model")
        model.to(env.device)
        if cfg.fp8:
            model = _float8(model, env)
        model = shard_model(model, env)
        if cfg.compile and _compiler_works(env.device):
            for block in model.layers:
                block.compile()
        return model

    def _load_initial_weights(self, model, path: str) -> None:
        from mellum.checkpoint import load_pretrained

        source = load_pretrained(path, dtype=torch.float32)
        # Rotary tables are buffers computed from this run's config (YaRN in the long-context stage): keep ours.
        missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
        # What this run trains from scratch (`train_only`, e.g. a new MTP head) may be absent from the source.
        if unexpected or [k for k in missing if "rotary" not in k and not (self.config.train_only and self._trains(k))]:
            raise ValueError(f"{path} does not match the recipe's model: missing {missing}, unexpected {unexpected}")

    def _trains(self, name: str) -> bool:
        return not self.config.train_only or name.startswith(tuple(self.config.train_only))

    def _autocast_context(self):
        precision = self.config.precision
        if precision == "auto":
            precision = "bf16" if self.env.device.type == "cuda" else "fp32"
        if precision == "bf16":
            return lambda: torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext

    def _phase_data(self, index: int) -> str:
        return self.config.phases[index].data if self.config.phases else self.config.data

    def _current_phase(self) -> int:
        if not self.config.phases:
            return 0
        fraction = self.progress.fraction()
        for i, phase in enumerate(self.config.phases):
            if fraction < phase.until:
                return i
        return len(self.config.phases) - 1

    def _open_loader(self, index: int, state: dict | None = None):
        cfg = self.config
        loader = open_shards(cfg, self._phase_data(index), self.env, seed=cfg.seed + 1000 * index)
        if state is not None:
            loader.load_state_dict(state)
        self.phase, self.loader, self._batches = index, loader, iter(loader)

    # ---- state ------------------------------------------------------------------------------------------
    def resume(self) -> bool:
        """Load the newest checkpoint under the output directory; False when there is none."""
        path = checkpointing.latest_checkpoint(self.out)
        if path is None:
            return False
        trainer_state, loader_state = checkpointing.load_checkpoint(path, self.model, self.optimizers,
                                                                    check=self._check_resumable)
        self.progress.load_state_dict(trainer_state["progress"])
        if trainer_state.get("last_eval") is not None:  # a finished run resumed reports its last evaluation again
            self.last_eval, self.last_losses = tuple(trainer_state["last_eval"]), trainer_state["last_losses"]
        if "best" in trainer_state:  # checkpoints written before best-tracking existed have none
            self.best.load_state_dict(trainer_state["best"])
        if self.config.keep_best and self.best.step is not None and self.env.is_main:
            if not (path / BEST_FILE).is_file():
                raise ValueError(f"{path} holds no best weights (written without keep_best): resume with the same "
                                 "settings")
            self.best.state = torch.load(path / BEST_FILE, map_location="cpu", weights_only=True)
        self._open_loader(loader_state["phase"], loader_state["loader"])
        return True

    def _check_resumable(self, trainer_state: dict) -> None:
        """Refuse a checkpoint written with other settings than this run's (those in RESUMABLE_CHANGES may differ)."""
        checkpointing.refuse_changed_settings(trainer_state.get("config"), self.config.to_dict(), self.out,
                                              RESUMABLE_CHANGES)

    def save(self) -> Path:
        trainer_state = {"step": self.progress.step, "progress": self.progress.state_dict(),
                         "best": self.best.state_dict(), "config": self.config.to_dict(),
                         "last_eval": self.last_eval, "last_losses": self.last_losses}
        loader_state = {"phase": self.phase, "loader": self.loader.state_dict()}
        meta = {"recipe": self.config.name, "world_size": self.env.world_size}
        extra = {BEST_FILE: self.best.state} if self.best.state is not None else None
        return checkpointing.save_checkpoint(self.out, self.model, self.optimizers, trainer_state, loader_state,
                                             meta, keep=self.config.keep_checkpoints, extra=extra)

    # ---- stepping ---------------------------------------------------------------------------------------
    def _next_batch(self) -> dict[str, torch.Tensor]:
        batch = next(self._batches)
        return {k: v.to(self.env.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self) -> dict:
        """One optimizer step over the global batch; returns its metrics."""
        cfg, env = self.config, self.env
        phase = self._current_phase()
        if phase != self.phase:
            self._open_loader(phase)
        accum = cfg.batch_ramp.accumulation_steps(self.progress.tokens, cfg.micro_batch, env.world_size)
        batches = [self._next_batch() for _ in range(accum)]
        # The number of predicted tokens in the whole global batch: every micro-batch's loss is a sum divided by
        # it, so accumulation and ranks add up to exactly the global mean (and one rank equals many).
        local = sum((valid_targets(b["targets"]) != IGNORE).sum() for b in batches).float()
        num_targets = all_reduce_sum(local).clamp(min=1.0)
        lr_factor = cfg.schedule.factor(self.progress.step, self.progress.fraction())
        lr = set_lr_factor(self.optimizers, lr_factor)
        ce_sum = torch.zeros((), device=env.device)
        extras: dict[str, float] = {}
        self.model.train()
        for batch in batches:
            with self.autocast():
                loss, parts = pretraining_loss(self.model, batch, self.weights, num_targets, cfg.doc_masking)
            # FSDP2 averages gradients over ranks; our loss is already a share of the global sum.
            (loss * env.world_size if env.distributed else loss).backward()
            ce_sum += parts["ce_sum"]
            for key in ("router_aux", "router_z"):
                if key in parts:
                    extras[key] = extras.get(key, 0.0) + parts[key].item() / accum
            if "mtp_sum" in parts:
                extras["mtp_sum"] = extras.get("mtp_sum", 0.0) + parts["mtp_sum"].item()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        loss_value = (all_reduce_sum(ce_sum) / num_targets).item()
        record = {"loss": loss_value, "lr": lr, "grad_norm": _item(grad_norm), "batch": accum * cfg.micro_batch * env.world_size,
                  "phase": self.phase}
        if "mtp_sum" in extras:
            record["mtp_loss"] = all_reduce_sum(torch.tensor(extras.pop("mtp_sum"), device=env.device)).item() / num_targets.item()
        record.update(extras)
        self.progress.step += 1
        self.progress.tokens += accum * cfg.micro_batch * env.world_size * cfg.seq_len
        return record

    def evaluate(self) -> float | None:
        """Mean next-token loss over `eval_batches` held-out batches in total (the same rows on every call)."""
        losses = self.evaluate_losses()
        return None if losses is None else losses["loss"]

    @torch.no_grad()
    def evaluate_losses(self) -> dict[str, float] | None:
        """Held-out means over `eval_batches` batches in total (the same rows on every call): `loss` (next token)
        and, for a model trained with an MTP loss, `mtp_loss` (token t+2, over the positions that have one)."""
        cfg, env = self.config, self.env
        if not cfg.eval_data:
            return None
        loader = open_shards(cfg, cfg.eval_data, env, seed=0, epochs=1)
        self.model.eval()
        sums = torch.zeros(4, device=env.device)  # next-token loss, its targets, MTP loss, its targets
        per_rank = max(1, cfg.eval_batches // env.world_size)  # the same rows in total for any number of ranks
        for i, batch in enumerate(loader):
            if i >= per_rank:
                break
            batch = {k: v.to(env.device) for k, v in batch.items()}
            with self.autocast():
                _, parts = pretraining_loss(self.model, batch, self.weights, 1.0, cfg.doc_masking)
            sums[0] += parts["ce_sum"]
            sums[1] += (valid_targets(batch["targets"]) != IGNORE).sum()
            if "mtp_sum" in parts:
                sums[2] += parts["mtp_sum"]
                sums[3] += parts["mtp_targets"]
        self.model.train()
        sums = all_reduce_sum(sums)
        losses = {"loss": (sums[0] / sums[1].clamp(min=1)).item()}
        if self.weights.mtp:
            losses["mtp_loss"] = (sums[2] / sums[3].clamp(min=1)).item()
        return losses

    def _evaluate_and_track(self, metrics: Metrics) -> float | None:
        """Evaluate and log; remember the evaluation with the lowest held-out objective (its weights too with
        keep_best). The objective is the next-token loss, plus the MTP loss at its weight when the model has one
        (so a run that trains only an MTP head keeps its best head)."""
        losses = self.evaluate_losses()
        if losses is None:
            return None
        step = self.progress.step
        metrics.log(step, **{f"eval_{k}": v for k, v in losses.items()})
        self.last_losses = losses
        loss = losses["loss"] + self.weights.mtp * losses.get("mtp_loss", 0.0)
        self.last_eval = (step, loss)
        if loss < self.best.loss:
            self.best.step, self.best.loss, self.best.stale = step, loss, 0
            if self.config.keep_best:
                self.best.state = self._cpu_weights()
        else:
            self.best.stale += 1
        return loss

    def _cpu_weights(self) -> dict | None:
        """A CPU copy of the full weights on rank 0 (None on other ranks); collective under FSDP."""
        state, _ = checkpointing.model_and_optimizer_state(self.model, [])
        if not self.env.is_main:
            return None
        return {k: _full(v).detach().to("cpu", copy=True) for k, v in state.items()}

    def out_of_patience(self) -> bool:
        return self.config.patience is not None and self.best.stale >= self.config.patience

    def fit(self) -> dict:
        """Train until max_steps, the time budget or `patience` runs out; checkpoint, evaluate and log along the
        way. The summary names the best evaluation (`best_step`, `best_eval_loss`). Its losses are the held-out
        objective (see `_evaluate_and_track`); `eval_mtp_loss` is the last evaluation's MTP loss alone."""
        cfg, env = self.config, self.env
        if self.loader is None:
            self._open_loader(self._current_phase())
        start_step = self.progress.step
        metrics = Metrics(self.out if env.is_main else None, cfg.max_steps, "pretrain", enabled=env.is_main,
                          resume_step=start_step, bar=self.bar)
        if env.is_main:
            (self.out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str) + "\n")
        eval_loss = self.last_eval[1] if self.last_eval else None  # a resumed run's last evaluation so far
        if start_step == 0:
            eval_loss = self._evaluate_and_track(metrics)
        run_start = time.perf_counter()
        seconds_before = self.progress.seconds
        window_tokens, window_start = 0, time.perf_counter()
        last_saved = start_step
        try:
            while not self.progress.done() and not self.out_of_patience():
                tokens_before = self.progress.tokens
                record = self.train_step()
                self.progress.seconds = seconds_before + _synced_time(env) - run_start
                window_tokens += self.progress.tokens - tokens_before
                step = self.progress.step
                now = time.perf_counter()
                tokens_per_s = window_tokens / max(now - window_start, 1e-9)
                if step % cfg.log_every == 0 or self.progress.done():
                    metrics.log(step, tokens=self.progress.tokens, tokens_per_s=round(tokens_per_s, 1),
                                elapsed_s=round(self.progress.seconds, 2), **record)
                    window_tokens, window_start = 0, now
                metrics.progress(step, record["loss"], tokens_per_s, self.progress.fraction(), self.progress.seconds)
                if cfg.eval_every and (step % cfg.eval_every == 0 or self.progress.done()):
                    eval_loss = self._evaluate_and_track(metrics)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    self.save()
                    last_saved = step
            if last_saved != self.progress.step:
                self.save()
        finally:
            metrics.close()
        summary = {"steps": self.progress.step, "tokens": self.progress.tokens,
                   "seconds": round(self.progress.seconds, 1), "eval_loss": eval_loss}
        if self.last_losses and "mtp_loss" in self.last_losses:
            summary["eval_mtp_loss"] = self.last_losses["mtp_loss"]
        if self.best.step is not None:
            summary.update(best_step=self.best.step, best_eval_loss=self.best.loss)
        if self.out_of_patience():
            summary["stopped_early"] = True
        self.write_summary(summary)
        return summary

    def write_summary(self, summary: dict) -> None:
        if self.env.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    def _exports_best(self) -> bool:
        return self.config.keep_best and self.best.step is not None

    def exported(self) -> dict:
        """Which weights `export` writes: `exported_step` and `exported_eval_loss` (None if not evaluated there)."""
        if self._exports_best():
            return {"exported_step": self.best.step, "exported_eval_loss": self.best.loss}
        step = self.progress.step
        loss = self.last_eval[1] if self.last_eval and self.last_eval[0] == step else None
        return {"exported_step": step, "exported_eval_loss": loss}

    def export(self, directory: str | os.PathLike) -> Path:
        """Write the model in the Hugging Face format (plus tokenizer, training config and log) — rank 0 writes.
        With `keep_best`, the weights of the best evaluation; otherwise the current ones."""
        from mellum.checkpoint import save_pretrained
        from mellum.model import Transformer

        cfg, env = self.config, self.env
        directory = Path(directory)
        if self._exports_best():
            state = self.best.state  # rank 0's CPU copy
        else:
            state, _ = checkpointing.model_and_optimizer_state(self.model, [])
        if env.is_main:
            plain = Transformer(cfg.model)  # unsharded, on the CPU
            plain.load_state_dict({k: _full(v).detach().to("cpu", torch.float32) for k, v in state.items()})
            save_pretrained(plain, directory, dtype=cfg.export_dtype, max_shard_size_mb=cfg.export_max_shard_mb)
            if cfg.tokenizer:
                from mellum.tokenizer import Tokenizer

                Tokenizer.from_pretrained(cfg.tokenizer).save(directory)
            shutil.copy(self.out / "train_config.json", directory / "training_config.json")
            if (self.out / "metrics.jsonl").is_file():
                shutil.copy(self.out / "metrics.jsonl", directory / "training_log.jsonl")
        barrier()
        return directory


def open_shards(config: TrainConfig, path: str, env: DistEnv, seed: int, epochs: int | None = None):
    """This rank's PackedLoader over a shard directory of the run; refuses shards whose token ids the model has no
    embedding for."""
    from mellum.data.shards import PackedLoader

    loader = PackedLoader(path, config.seq_len, config.micro_batch, seed=seed, rank=env.rank,
                          world_size=env.world_size, epochs=epochs)
    _check_vocab(f"shards in {path} use", loader.shards.vocab_size, config.model.vocab_size)
    return loader


def check_inputs(config: TrainConfig, env: DistEnv) -> None:
    """Open what the run reads — every phase's shards, the held-out shards, the tokenizer — before the model is
    built or anything is written: a wrong path or vocabulary fails the start, not a later phase, evaluation or
    the export at the end."""
    data = [phase.data for phase in config.phases] if config.phases else [config.data]
    for path in data:
        open_shards(config, path, env, seed=config.seed)
    if config.eval_data:
        open_shards(config, config.eval_data, env, seed=0, epochs=1)
    if config.tokenizer:
        from mellum.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_pretrained(config.tokenizer)
        _check_vocab(f"the tokenizer {config.tokenizer} has", tokenizer.vocab_size, config.model.vocab_size)


def _check_vocab(what: str, vocab_size: int, model_vocab_size: int) -> None:
    # A token id at or past the model's vocabulary indexes past its embedding table: refuse, naming the override.
    if vocab_size > model_vocab_size:
        raise ValueError(f"{what} a vocabulary of {vocab_size} tokens, larger than the model's {model_vocab_size}: "
                         f"give the model that vocabulary with --set model.vocab_size={vocab_size}")


def _compiler_works(device: torch.device) -> bool:
    """Compile and run a two-op function first: a machine without a working toolchain (no C compiler for
    Triton/Inductor) then trains eagerly with a warning instead of failing at the first step."""
    try:
        fn = torch.compile(lambda x: torch.nn.functional.silu(x) * 2.0)
        fn(torch.randn(16, device=device))
        return True
    except Exception as exc:  # any toolchain failure: eager mode still trains correctly
        print(f"warning: torch.compile does not work here ({type(exc).__name__}: {exc}); training eagerly",
              file=sys.stderr)
        return False


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _synced_time(env: DistEnv) -> float:
    # Wall time after the GPU's queued work finished, agreed by all ranks (rank 0's clock) so they stop together.
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
    now = time.perf_counter()
    if env.distributed and env.device.type == "cpu":
        return now  # CPU ranks step in lockstep through collectives; the step count decides
    if env.distributed:
        t = torch.tensor([now], dtype=torch.float64, device=env.device)
        torch.distributed.broadcast(t, src=0)
        return float(t.item())
    return now


def _item(x) -> float:
    x = x.full_tensor() if hasattr(x, "full_tensor") else x
    return float(x)


def _float8(model, env: DistEnv):
    """torchao float8 training (tensorwise scaling) for hidden linears whose dims are multiples of 16."""
    if env.device.type != "cuda":
        raise ValueError("fp8 training needs a CUDA GPU with float8 support (H100 class)")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as exc:
        raise ValueError("fp8 training needs torchao: pip install torchao") from exc

    def keep(module, fqn: str) -> bool:
        return (isinstance(module, torch.nn.Linear) and "lm_head" not in fqn
                and module.in_features % 16 == 0 and module.out_features % 16 == 0)

    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("tensorwise"), module_filter_fn=keep)
    return model


# ---- command line --------------------------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help=f"training recipe: {', '.join(RECIPES)}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field by dotted path, e.g. --set optim.lr=1e-3 --set model.num_layers=4")
    parser.add_argument("--out", default=None, help="run directory (checkpoints, metrics, exported model); "
                        "default runs/RECIPE")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if present")
    parser.add_argument("--data", help="training shard directory (overrides the recipe's)")
    parser.add_argument("--eval-data", help="held-out shard directory (overrides the recipe's)")
    parser.add_argument("--tokenizer", help="tokenizer directory saved next to the exported model")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    parser.add_argument("--max-minutes", type=float, help="wall-clock budget of the training loop; the LR decay "
                        "follows it and training ends cleanly (checkpoint + export) when it is spent")
    parser.add_argument("--patience", type=int, help="stop after this many evaluations in a row without a lower "
                        "held-out loss")
    parser.add_argument("--export", default=None, help="directory for the Hugging Face model (default OUT/model)")
    parser.add_argument("--no-export", action="store_true", help="skip the Hugging Face export")
    parser.add_argument("--no-bar", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")


def config_from_args(args) -> TrainConfig:
    overrides = list(args.overrides)
    for flag, key in (("data", "data"), ("eval_data", "eval_data"), ("tokenizer", "tokenizer"),
                      ("max_steps", "max_steps"), ("max_minutes", "max_minutes"), ("patience", "patience")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}")
    return get_recipe(args.recipe, overrides)


def run(args) -> int:
    config = config_from_args(args)
    out = Path(args.out or Path("runs") / config.name)
    env = init_distributed(args.device)
    try:
        if not args.resume and checkpointing.latest_checkpoint(out) is not None:
            raise FileExistsError(f"{out} already holds checkpoints: pass --resume to continue, or another --out")
        if not args.no_export:
            from mellum.checkpoint import check_export_dir

            sources = {"starting model": config.init_from, "tokenizer": config.tokenizer, "training data": config.data,
                       "held-out data": config.eval_data}
            sources.update({f"data of phase {i + 1}": phase.data for i, phase in enumerate(config.phases)})
            check_export_dir(args.export or out / "model", sources)
        check_inputs(config, env)
        # `out` is made by `fit` once model and data have loaded: a failed start leaves nothing behind.
        trainer = Trainer(config, out, env, bar=not args.no_bar and env.is_main)
        if args.resume and trainer.resume() and env.is_main:
            print(f"resumed from step {trainer.progress.step}", file=sys.stderr)
        summary = trainer.fit()
        if not args.no_export:
            path = trainer.export(args.export or out / "model")
            summary.update(model=str(path), **trainer.exported())
            trainer.write_summary(summary)
        if env.is_main:
            print(json.dumps(summary))
    finally:
        shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mellum.train.pretrain", description=__doc__.splitlines()[0])
    configure(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError, FileExistsError) as exc:
        print(f"mellum: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
