"""Training checkpoints: model, optimizers, schedule progress, data-loader position and RNG, written atomically.

Layout under a run directory:

    checkpoints/step_000200/state.pt     model + optimizer state (full, unsharded; written by rank 0)
    checkpoints/step_000200/rank_0.pt    per-rank data-loader position and RNG states
    checkpoints/step_000200/meta.json    step, tokens, the run's config (for humans and sanity checks)
    checkpoints/step_000200/NAME.pt      further objects of the trainer's (`extra`), e.g. the best weights so far
    checkpoints/latest                   name of the newest complete checkpoint

A checkpoint is written into `step_N.tmp/`, renamed into place only when complete, and `latest` is replaced
atomically afterwards: a run killed at any moment (SIGKILL included) leaves the previous checkpoint usable.
Resuming restores everything the next step depends on, so a resumed run reproduces the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

LATEST = "latest"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def model_and_optimizer_state(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> tuple[dict, list | dict]:
    """Full (unsharded) state dicts; under FSDP2 gathered to rank 0 on CPU (other ranks get empty dicts)."""
    if not _distributed():
        return model.state_dict(), [opt.state_dict() for opt in optimizers]
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizers, options=options)


def load_model_and_optimizer_state(model: nn.Module, optimizers: list[torch.optim.Optimizer], state: dict) -> None:
    if not _distributed():
        model.load_state_dict(state["model"])
        if len(state["optimizers"]) != len(optimizers):
            raise ValueError("checkpoint optimizer count differs from this run's (did the recipe change?)")
        for opt, opt_state in zip(optimizers, state["optimizers"]):
            opt.load_state_dict(opt_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_state_dict(model, optimizers, model_state_dict=state.get("model", {}),
                   optim_state_dict=state.get("optimizers", {}), options=options)


def save_checkpoint(
    run_dir: str | os.PathLike,
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    trainer_state: dict,
    loader_state: dict,
    meta: dict,
    keep: int = 2,
    extra: dict[str, object] | None = None,
) -> Path:
    """Write a checkpoint collectively (every rank calls this); returns its directory. Keeps the newest `keep`.
    `extra` maps file names to objects rank 0 saves into the checkpoint as well (read back with torch.load)."""
    root = Path(run_dir) / "checkpoints"
    step = int(trainer_state["step"])
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    rank = _rank()
    model_state, optim_state = model_and_optimizer_state(model, optimizers)  # collective under FSDP
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    torch.save({"loader": loader_state, "rng": rng_state()}, tmp / f"rank_{rank}.pt")
    if rank == 0:
        torch.save({"model": model_state, "optimizers": optim_state, "trainer": trainer_state}, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({**meta, **trainer_state}, indent=2, default=str) + "\n")
        for name, obj in (extra or {}).items():
            torch.save(obj, tmp / name)
    _barrier()
    if rank == 0:
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, final.name + "\n")
        _prune(root, keep)
    _barrier()
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "state.pt").is_file() else None


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizers: list[torch.optim.Optimizer],
    check: Callable[[dict], None] | None = None,
) -> tuple[dict, dict]:
    """Restore model, optimizers and this rank's RNG; returns (trainer_state, loader_state) for the caller.
    `check(trainer_state)` runs on every rank before anything is restored (it raises to refuse the checkpoint)."""
    path = Path(path)
    rank = _rank()
    rank_file = path / f"rank_{rank}.pt"
    if not rank_file.is_file():
        raise ValueError(f"checkpoint {path} has no state for rank {rank}: resume with the same number of processes")
    # Only rank 0 reads the full state under FSDP; set_state_dict broadcasts it.
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False) if rank == 0 or not _distributed() else {}
    trainer = state.get("trainer")
    if _distributed():
        box = [trainer]
        dist.broadcast_object_list(box, src=0)
        trainer = box[0]
    if check is not None:
        check(trainer)
    load_model_and_optimizer_state(model, optimizers, state)
    per_rank = torch.load(rank_file, map_location="cpu", weights_only=False)
    set_rng_state(per_rank["rng"])
    return trainer, per_rank["loader"]


def refuse_changed_settings(saved: dict | None, now: dict, run_dir, may_change: tuple[str, ...] = ()) -> None:
    """Refuse to resume when a setting (dotted path into nested dicts) differs between a checkpoint's settings and
    the resuming run's, except those whose top-level key is in `may_change`; the error names the first few as
    "key: old → new". `saved` None: a checkpoint written before checkpoints carried their settings; a setting the
    checkpoint does not record (added to the settings since it was written) is not compared either."""
    if saved is None:
        return
    saved, now = _flatten(saved), _flatten(now)
    keys = sorted(k for k in saved if k.split(".")[0] not in may_change)
    changed = [f"{k}: {saved.get(k)!r} → {now.get(k)!r}" for k in keys if saved.get(k) != now.get(k)]
    if changed:
        raise ValueError(f"the checkpoint in {run_dir} was written with other settings ({', '.join(changed[:6])}): "
                         "resume with the run's settings and data, or start a new run in another --out")


def _flatten(tree: dict, prefix: str = "") -> dict:
    # {"optim": {"lr": 1e-3}} → {"optim.lr": 1e-3}; sequences become tuples so saved and new settings compare.
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = _frozen(value)
    return flat


def _frozen(value):
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    return value


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    for file in path.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
