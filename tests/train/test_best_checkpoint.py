"""Best-checkpoint export and early stopping: the exported weights are those of the lowest held-out loss, patience
ends a run that stopped improving, and both survive a resume exactly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from mellum.train.distributed import init_distributed
from mellum.train.metrics import read_metrics
from mellum.train.pretrain import Trainer, main
from mellum.train.recipes import get_recipe

# Evaluations every 5 steps over 30 steps: on one training file the held-out loss bottoms out early (step 10).
SETTINGS = ["max_steps=30", "eval_every=5", "checkpoint_every=0", "keep_best=True"]


def _overrides(shards, *extra: str) -> list[str]:
    train, heldout, tokenizer = shards
    return [f"data={train!r}", f"eval_data={heldout!r}", f"tokenizer={tokenizer!r}", *SETTINGS, *extra]


def _evals(run_dir) -> list[tuple[int, float]]:
    return [(r["step"], r["eval_loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "eval_loss" in r]


def _heldout_loss(model_dir, shards) -> float:
    """The held-out loss of an exported model, measured by a fresh trainer initialised from it."""
    config = get_recipe("tiny-cpu", _overrides(shards, f"init_from={str(model_dir)!r}"))
    return Trainer(config, model_dir.parent / "reeval", init_distributed("cpu"), bar=False).evaluate()


def _cli(run_dir, shards, *args: str) -> dict:
    argv = ["--recipe", "tiny-cpu", "--device", "cpu", "--no-bar", "--out", str(run_dir)]
    for override in _overrides(shards):
        argv += ["--set", override]
    assert main(argv + list(args)) == 0
    return json.loads((run_dir / "summary.json").read_text())


def test_export_holds_the_weights_of_the_lowest_heldout_loss(tmp_path, overfit_shards):
    summary = _cli(tmp_path / "run", overfit_shards)
    evals = _evals(tmp_path / "run")
    assert [s for s, _ in evals] == [0, 5, 10, 15, 20, 25, 30]
    best_step, best_loss = min(evals, key=lambda e: e[1])
    assert 0 < best_step < 30 and evals[-1][1] > best_loss + 0.5, evals  # the curve turns up: over-fitting
    assert (summary["steps"], summary["eval_loss"]) == (30, evals[-1][1]) and "stopped_early" not in summary
    assert (summary["best_step"], summary["best_eval_loss"]) == (best_step, best_loss)
    assert (summary["exported_step"], summary["exported_eval_loss"]) == (best_step, best_loss)
    # Re-evaluated from the exported files, the model scores exactly the best logged held-out loss.
    assert _heldout_loss(tmp_path / "run" / "model", overfit_shards) == pytest.approx(best_loss, abs=1e-6)


def test_without_keep_best_the_last_weights_are_exported(tmp_path, overfit_shards):
    config = get_recipe("tiny-cpu", _overrides(overfit_shards, "keep_best=False"))
    trainer = Trainer(config, tmp_path / "run", init_distributed("cpu"), bar=False)
    summary = trainer.fit()
    last_step, last_loss = _evals(tmp_path / "run")[-1]
    assert trainer.exported() == {"exported_step": 30, "exported_eval_loss": last_loss} and last_step == 30
    assert summary["best_step"] < 30 and trainer.best.state is None  # tracked, but no weights kept
    assert _heldout_loss(trainer.export(tmp_path / "model"), overfit_shards) == pytest.approx(last_loss, abs=1e-6)


def test_patience_stops_the_run(tmp_path, overfit_shards):
    _cli(tmp_path / "full", overfit_shards)
    full = _evals(tmp_path / "full")
    best_step = min(full, key=lambda e: e[1])[0]
    summary = _cli(tmp_path / "patient", overfit_shards, "--patience", "2")
    # Two evaluations without a lower loss after the best one, then the run ends (checkpointed and exported).
    stop = best_step + 2 * 5
    assert summary["steps"] == stop and summary["stopped_early"] is True
    assert _evals(tmp_path / "patient") == [e for e in full if e[0] <= stop]  # the same run up to there
    assert summary["exported_step"] == best_step
    assert (tmp_path / "patient" / "checkpoints" / "latest").read_text().strip() == f"step_{stop:06d}"


def test_resume_restores_best_weights_and_patience(tmp_path, overfit_shards):
    config = get_recipe("tiny-cpu", _overrides(overfit_shards, "patience=3", "checkpoint_every=5",
                                               "keep_checkpoints=10"))
    first = Trainer(config, tmp_path / "a", init_distributed("cpu"), bar=False)
    summary = first.fit()
    best_step, stop = summary["best_step"], summary["best_step"] + 3 * 5
    assert summary["steps"] == stop and summary["stopped_early"]
    # Resume a copy of the run from the checkpoint one evaluation before the stop (two stale evaluations in).
    resumed_at = stop - 5
    checkpoints = tmp_path / "b" / "checkpoints"
    shutil.copytree(tmp_path / "a" / "checkpoints" / f"step_{resumed_at:06d}", checkpoints / f"step_{resumed_at:06d}")
    (checkpoints / "latest").write_text(f"step_{resumed_at:06d}\n")
    second = Trainer(config, tmp_path / "b", init_distributed("cpu"), bar=False)
    assert second.resume() and (second.best.step, second.best.stale) == (best_step, 2)
    again = second.fit()
    assert again["steps"] == stop and again["stopped_early"]  # one more stale evaluation, as in the first run
    assert (again["best_step"], again["best_eval_loss"]) == (best_step, summary["best_eval_loss"])
    assert _evals(tmp_path / "b") == [e for e in _evals(tmp_path / "a") if e[0] > resumed_at]
    for name, tensor in first.best.state.items():  # the best weights came back from the checkpoint
        assert torch.equal(second.best.state[name], tensor), name
    assert second.exported() == first.exported() == {"exported_step": best_step,
                                                      "exported_eval_loss": summary["best_eval_loss"]}


def test_patience_must_be_positive():
    with pytest.raises(ValueError, match="patience"):
        get_recipe("tiny-cpu", ["patience=0"])
    assert get_recipe("mellum-tiny").keep_best and get_recipe("mellum-tiny-cpu").keep_best
    assert not get_recipe("mellum-4b").keep_best and get_recipe("mellum2").patience is None
