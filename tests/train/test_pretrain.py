"""The pre-training loop end to end on CPU: learning, exact resume after SIGKILL, 2 processes = 1 process."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mellum.train.distributed import init_distributed
from mellum.train.metrics import read_metrics
from mellum.train.pretrain import Trainer
from mellum.train.recipes import get_recipe
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[2]


def _data_overrides(code_shards):
    train, heldout, tokenizer = code_shards
    return [f"data={train!r}", f"eval_data={heldout!r}", f"tokenizer={tokenizer!r}"]


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mellum.train.pretrain", "--device", "cpu", "--no-bar", *args]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_short_run_lowers_heldout_loss_and_exports(tmp_path, code_shards):
    from mellum.checkpoint import load_pretrained
    from mellum.tokenizer import Tokenizer

    config = get_recipe("tiny-cpu", _data_overrides(code_shards) + ["max_steps=30", "eval_every=30",
                                                                    "checkpoint_every=0", "seed=3"])
    trainer = Trainer(config, tmp_path / "run", init_distributed("cpu"), bar=False)
    summary = trainer.fit()
    evals = [r["eval_loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval_loss" in r]
    assert len(evals) == 2 and evals[0] == pytest.approx(6.93, abs=0.2)  # ≈ ln(1024) at initialisation
    assert evals[-1] < evals[0] - 1.0, evals  # fixed seed: the held-out loss falls by more than a nat
    assert summary["steps"] == 30 and summary["tokens"] == 30 * 8 * 64
    assert (tmp_path / "run" / "checkpoints" / "latest").is_file()  # the final state is saved
    # The Hugging Face export reloads into the same function.
    out = trainer.export(tmp_path / "model")
    model = load_pretrained(out)
    ids = torch.arange(32).reshape(1, 32)
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, trainer.model(ids).logits, atol=1e-5, rtol=0)
    assert Tokenizer.from_pretrained(out).vocab_size == 1024
    assert (out / "training_log.jsonl").is_file() and json.loads((out / "training_config.json").read_text())["name"] == "tiny-cpu"


def test_moe_recipe_trains_with_every_loss_term(tmp_path, code_shards):
    config = get_recipe("tiny-moe-cpu", _data_overrides(code_shards) + ["max_steps=3", "eval_every=0",
                                                                        "checkpoint_every=0"])
    trainer = Trainer(config, tmp_path / "run", init_distributed("cpu"), bar=False)
    trainer.fit()
    last = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r][-1]
    assert {"router_aux", "router_z", "mtp_loss"} <= last.keys()
    assert 0.9 < last["router_aux"] < 2.0 and last["router_z"] > 0 and 5.0 < last["mtp_loss"] < 8.0


def test_long_context_stage_continues_from_exported_model(tmp_path, code_shards):
    base = get_recipe("tiny-cpu", _data_overrides(code_shards) + ["max_steps=2", "eval_every=0", "checkpoint_every=0"])
    first = Trainer(base, tmp_path / "base", init_distributed("cpu"), bar=False)
    first.fit()
    exported = first.export(tmp_path / "base-model")
    config = get_recipe("tiny-long-cpu", _data_overrides(code_shards) + [f"init_from={str(exported)!r}",
                                                                         "max_steps=2", "checkpoint_every=0", "eval_every=2"])
    trainer = Trainer(config, tmp_path / "long", init_distributed("cpu"), bar=False)
    for name, p in trainer.model.named_parameters():  # starts from the exported weights
        torch.testing.assert_close(p, first.model.state_dict()[name])
    summary = trainer.fit()
    assert summary["tokens"] == 2 * 4 * 128 and summary["eval_loss"] < 7.0


def test_mtp_head_trains_on_a_frozen_finished_model(tmp_path, code_shards):
    """`train_only`: an MTP head added to an exported dense model learns while every trunk weight stays put."""
    from mellum.checkpoint import load_pretrained

    base = get_recipe("tiny-cpu", _data_overrides(code_shards) + ["max_steps=20", "eval_every=0", "checkpoint_every=0"])
    first = Trainer(base, tmp_path / "base", init_distributed("cpu"), bar=False)
    first.fit()
    exported = first.export(tmp_path / "base-model")
    config = get_recipe("tiny-cpu", _data_overrides(code_shards) + [
        f"init_from={str(exported)!r}", "model.num_mtp_layers=1", "train_only=mtp.", "max_steps=20",
        "eval_every=20", "checkpoint_every=0", "optim.lr=3e-3"])
    assert config.train_only == ("mtp.",)
    trainer = Trainer(config, tmp_path / "mtp", init_distributed("cpu"), bar=False)
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("mtp.") for n in trained)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    summary = trainer.fit()
    for name, p in trainer.model.named_parameters():
        if name.startswith("mtp."):
            if p.ndim == 2:  # matrices move (the norms' weights may stay close to one)
                assert not torch.equal(p, before[name]), name
        else:
            torch.testing.assert_close(p, before[name], atol=0, rtol=0)
    evals = [r for r in read_metrics(tmp_path / "mtp" / "metrics.jsonl") if "eval_mtp_loss" in r]
    assert len(evals) == 2 and evals[0]["eval_loss"] == pytest.approx(evals[1]["eval_loss"], abs=1e-5)
    assert evals[1]["eval_mtp_loss"] < evals[0]["eval_mtp_loss"] - 0.5, evals  # the head learns token t+2
    assert summary["eval_mtp_loss"] == pytest.approx(evals[1]["eval_mtp_loss"])
    assert summary["eval_loss"] == pytest.approx(evals[1]["eval_loss"] + 0.3 * evals[1]["eval_mtp_loss"])
    model = load_pretrained(trainer.export(tmp_path / "mtp-model"))  # a Llama model with an MTP head
    assert model.config.architecture == "llama" and model.config.num_mtp_layers == 1
    torch.testing.assert_close(model.mtp.fc.weight, trainer.model.mtp.fc.weight)
    with pytest.raises(ValueError, match="matches no parameter"):
        Trainer(dataclasses.replace(config, init_from=None, train_only=("nothing.",)), tmp_path / "x",
                init_distributed("cpu"), bar=False)


def test_exact_resume_after_sigkill(tmp_path, code_shards):
    args = [f"--set={o}" for o in _data_overrides(code_shards)] + [
        "--max-steps", "24", "--set", "checkpoint_every=4", "--set", "eval_every=0", "--no-export"]
    reference = tmp_path / "reference"
    subprocess.run(_command("--recipe", "tiny-cpu", "--out", str(reference), *args), env=_env(), check=True,
                   capture_output=True, timeout=240)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_command("--recipe", "tiny-cpu", "--out", str(killed), *args), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 180
    while not latest.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (killed / "summary.json").exists(), "the run ended before the kill"
    killed_at = int(latest.read_text().strip().split("_")[1])
    assert 4 <= killed_at < 24
    # A fresh start into a directory with checkpoints is refused; --resume continues.
    refused = subprocess.run(_command("--recipe", "tiny-cpu", "--out", str(killed), *args), env=_env(),
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    subprocess.run(_command("--recipe", "tiny-cpu", "--out", str(killed), "--resume", *args), env=_env(), check=True,
                   capture_output=True, timeout=240)
    expected, resumed = _losses(reference), _losses(killed)
    assert [s for s, _ in resumed] == list(range(1, 25))
    assert resumed == expected  # exactly equal on CPU, step for step


def test_resume_refuses_other_settings_and_a_finished_run_keeps_its_summary(tmp_path, code_shards, capsys):
    from mellum.train.pretrain import main

    out = str(tmp_path / "run")
    args = ["--recipe", "tiny-cpu", "--device", "cpu", "--no-bar", "--out", out, "--no-export", "--set",
            "checkpoint_every=2", "--set", "eval_every=2", "--set", "eval_batches=1",
            *[f"--set={o}" for o in _data_overrides(code_shards)]]
    assert main([*args, "--max-steps", "2"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["steps"] == 2 and first["eval_loss"] is not None
    # Another learning rate or model shape is refused before anything is restored, with the difference named.
    assert main([*args, "--max-steps", "4", "--resume", "--set", "optim.lr=0.5"]) == 2
    assert "optim.lr: 0.01 → 0.5" in capsys.readouterr().err
    assert main([*args, "--max-steps", "4", "--resume", "--set", "model.num_layers=3"]) == 2
    assert "model.num_layers: 2 → 3" in capsys.readouterr().err
    # Resuming the finished run changes nothing, and its summary keeps the last evaluation.
    assert main([*args, "--max-steps", "2", "--resume"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again == first == json.loads((tmp_path / "run" / "summary.json").read_text())
    # A longer budget is a setting a resume may change: the run goes on from its checkpoint.
    assert main([*args, "--max-steps", "4", "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 4
    assert [s for s, _ in _losses(tmp_path / "run")] == [1, 2, 3, 4]


def test_an_export_that_would_overwrite_something_else_is_refused_before_training(tmp_path, code_shards, capsys):
    """`--export` into a folder of other files mixed the model into it, and onto the data or the tokenizer it
    overwrote them, all after the whole run; now refused before the run directory is made."""
    from mellum.train.pretrain import main

    train, _, tokenizer = code_shards
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    args = ["--recipe", "tiny-cpu", "--device", "cpu", "--no-bar", "--max-steps", "1",
            *[f"--set={o}" for o in _data_overrides(code_shards)]]
    for export, message in ((notes, "not a model directory"), (Path(tokenizer), "contains the tokenizer"),
                            (Path(train), "contains the training data")):
        out = tmp_path / f"run-{export.name}"
        assert main([*args, "--out", str(out), "--export", str(export)]) == 2
        assert message in capsys.readouterr().err and not out.exists()
    assert sorted(p.name for p in notes.iterdir()) == ["todo.txt"]
    assert main([*args, "--out", str(tmp_path / "run"), "--export", str(tmp_path / "new-model")]) == 0
    assert (tmp_path / "new-model" / "config.json").is_file()


def test_a_failed_start_leaves_no_run_directory(tmp_path, code_shards, capsys):
    """`mellum train pretrain --data /nonexist --out runs/y` made an empty runs/y before the data was read; held-out
    data and the tokenizer were read only at the first evaluation and at the export after the whole run."""
    from mellum.cli import main

    train, heldout, tokenizer = code_shards
    args = ["train", "pretrain", "--recipe", "tiny-cpu", "--device", "cpu", "--no-bar", "--max-steps", "1",
            "--set", "eval_every=0", "--data", train, "--eval-data", heldout, "--tokenizer", tokenizer]
    missing = str(tmp_path / "nonexist")
    for flag, message in (("--data", f"{missing} is not a shard directory"),
                          ("--eval-data", f"{missing} is not a shard directory"),
                          ("--tokenizer", f"no tokenizer.json at {missing}")):
        out = tmp_path / "runs" / flag.strip("-")
        assert main([*args, flag, missing, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err and not out.parent.exists(), flag


def test_a_vocabulary_mismatch_names_the_setting_that_fixes_it(tmp_path, code_shards, capsys):
    from mellum.cli import main

    train, heldout, tokenizer = code_shards  # made with a 1,024-token tokenizer
    args = ["train", "pretrain", "--recipe", "tiny-cpu", "--device", "cpu", "--no-bar", "--max-steps", "1",
            "--set", "eval_every=0", "--data", train, "--eval-data", heldout, "--tokenizer", tokenizer]
    out = tmp_path / "small"
    assert main([*args, "--set", "model.vocab_size=512", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (f"shards in {train} use a vocabulary of 1024 tokens, larger than the model's 512: give the model that "
            "vocabulary with --set model.vocab_size=1024") in err, err
    assert not out.exists()
    # The option as the message gives it is accepted and the run trains.
    assert main([*args, "--set", "model.vocab_size=512", "--set", "model.vocab_size=1024", "--out", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 1


def test_two_processes_match_one(tmp_path, code_shards):
    args = [f"--set={o}" for o in _data_overrides(code_shards)] + [
        "--max-steps", "4", "--set", "checkpoint_every=2", "--set", "eval_every=4", "--no-export"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(_command("--recipe", "tiny-cpu", "--out", str(one), *args), env=_env(), check=True,
                   capture_output=True, timeout=240)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port())]
    result = subprocess.run(torchrun + _command("--recipe", "tiny-cpu", "--out", str(two), *args)[1:], env=_env(),
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = _losses(one), _losses(two)
    assert [s for s, _ in a] == [s for s, _ in b] == [1, 2, 3, 4]
    for (_, x), (_, y) in zip(a, b):
        assert y == pytest.approx(x, abs=1e-5)
    evals = [[r["eval_loss"] for r in read_metrics(d / "metrics.jsonl") if "eval_loss" in r] for d in (one, two)]
    assert evals[1] == pytest.approx(evals[0], abs=1e-5)
    # The sharded run's checkpoint holds full (unsharded) tensors.
    state = torch.load(two / "checkpoints" / "step_000004" / "state.pt", weights_only=False)
    assert state["model"]["embed_tokens.weight"].shape == (1024, 64)
