"""DPO: the loss against its formula, log-probs of responses, reference on the fly = precomputed, and DPO on pairs
exported from a real telemetry database raises the chosen-over-rejected margin on held-out pairs."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from mellum.train.dpo import DPOConfig, dpo_loss, encode_pairs, pair_logps, read_pairs, sequence_logps, train_dpo
from mellum.train.optim import OptimConfig
from mellum.train.schedule import WSDSchedule
from mellum.train.sft import FinetuneConfig
from tests.conftest import STDLIB


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py


def _model(seed=0):
    from mellum.config import get_config
    from mellum.model import Transformer

    torch.manual_seed(seed)
    return Transformer(get_config("tiny-dense"))


def test_dpo_loss_against_the_formula():
    # chosen = rejected (policy = reference): every reward is 0 and the loss is log 2.
    x = torch.tensor([-3.0, -7.5])
    loss, cr, rr = dpo_loss(x, x, x, x, beta=0.1)
    assert loss.tolist() == pytest.approx([math.log(2)] * 2)
    assert cr.tolist() == [0.0, 0.0] and rr.tolist() == [0.0, 0.0]
    # By hand: β = 0.5; chosen gains 1 nat over the reference, rejected loses 1 → margin 1, loss log(1 + e^-1).
    loss, cr, rr = dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5)
    assert cr.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.0)))
    # Equal policy log-probs but a reference favouring the rejected one: the loss is below log 2.
    loss, _, _ = dpo_loss(torch.tensor([-2.0]), torch.tensor([-2.0]), torch.tensor([-3.0]), torch.tensor([-1.0]), 1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2.0)))
    with pytest.raises(ValueError):
        DPOConfig(beta=0.0)


def test_sequence_logps_sum_response_tokens_only():
    model = _model().eval()
    prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14, 15]]
    with torch.no_grad():
        batched = sequence_logps(model, prompts, responses, pad_id=0)
        for b, (p, r) in enumerate(zip(prompts, responses)):
            ids = torch.tensor([p + r])
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)  # [T, V]
            by_hand = sum(logp[len(p) - 1 + i, t].item() for i, t in enumerate(r))
            assert batched[b].item() == pytest.approx(by_hand, abs=1e-4)  # padding changes nothing


def _telemetry_pairs(tmp_path, tokenizer_files, n_per_file, seed):
    """Record, in a real telemetry database, a real line of code accepted and a garbled one rejected at the same
    cursor; export the DPO pairs as the serving side does."""
    from mellum.serve.telemetry import TelemetryEvent, TelemetryStore, export_preferences

    rng = np.random.default_rng(seed)
    db = tmp_path / f"telemetry-{seed}.db"
    with TelemetryStore(db) as store:
        for name in tokenizer_files:
            text = (STDLIB / name).read_text(encoding="utf-8")
            starts = [i + 1 for i, c in enumerate(text) if c == "\n"]
            lines = [(a, text.index("\n", a)) for a in starts if "\n" in text[a:]]
            lines = [(a, b) for a, b in lines if 20 <= b - a <= 70 and a > 300]
            for k in rng.choice(len(lines), size=n_per_file, replace=False):
                a, b = lines[int(k)]
                line = text[a:b]
                ctx = dict(path=name, prefix=text[a - 300:a], suffix=text[b:b + 80])
                good, bad = f"{name}-{a}-good", f"{name}-{a}-bad"
                store.record_completion(good, text=line, **ctx)
                store.record_completion(bad, text=line[::-1], **ctx)
                store.record_events([TelemetryEvent(good, "shown"), TelemetryEvent(good, "accepted"),
                                     TelemetryEvent(bad, "shown"), TelemetryEvent(bad, "rejected")])
    out = tmp_path / f"pairs-{seed}.jsonl"
    assert export_preferences(db, out) == n_per_file * len(tokenizer_files)
    return read_pairs(out)


def test_dpo_raises_heldout_margin_on_exported_telemetry_pairs(tiny_tokenizer, tmp_path):
    train = _telemetry_pairs(tmp_path, ["textwrap.py", "argparse.py", "shlex.py", "string.py"], 12, seed=0)
    heldout = _telemetry_pairs(tmp_path, ["copy.py", "csv.py"], 8, seed=1)
    assert all(p["prompt"].startswith(f"<filename>{p['path']}\n<fim_suffix>") for p in train)  # Mellum prompts
    policy = _model(1)
    config = FinetuneConfig(max_steps=16, batch_size=8, micro_batch=8, max_len=256, eval_every=0,
                            optim=OptimConfig(lr=2e-3, weight_decay=0.0, muon=False), schedule=WSDSchedule(2, 0.2))
    summary = train_dpo(policy, tiny_tokenizer, train, heldout, config, DPOConfig(beta=0.1), bar=False)
    before, after = summary["heldout_before"], summary["heldout_after"]
    assert before["reward_margin"] == 0.0 and before["loss"] == pytest.approx(math.log(2))  # policy = reference
    assert after["reward_margin"] > 1.0 and after["accuracy"] >= 0.8, after
    assert after["logp_margin"] > before["logp_margin"] + 5.0  # in nats: π(chosen)/π(rejected) grew on unseen pairs
    assert after["loss"] < math.log(2) - 0.2


def test_reference_on_the_fly_equals_precomputed(tiny_tokenizer, tmp_path):
    pairs = [{"prompt": "<filename>a.py\n<fim_suffix>\n<fim_prefix>def f(x):\n    return <fim_middle>",
              "chosen": "x + 1", "rejected": "x - 1"},
             {"prompt": "<filename>b.py\n<fim_suffix>\n<fim_prefix>import <fim_middle>",
              "chosen": "os", "rejected": "os, sys"}]
    config = FinetuneConfig(max_steps=3, batch_size=2, micro_batch=1, max_len=64, eval_every=0,
                            optim=OptimConfig(lr=1e-3, weight_decay=0.0, muon=False), schedule=WSDSchedule(0, 0.0))
    base = _model(2)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    train_dpo(a, tiny_tokenizer, pairs, [], config, DPOConfig(beta=0.2, precompute_reference=True), bar=False)
    train_dpo(b, tiny_tokenizer, pairs, [], config, DPOConfig(beta=0.2, precompute_reference=False),
              reference=copy.deepcopy(base), bar=False)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(pa, pb) for pa, pb in zip(a.parameters(), base.parameters()))
    # Long prompts keep their end; responses end with the end-of-text token.
    (enc,) = encode_pairs(tiny_tokenizer, [{"prompt": "x = 1\n" * 200, "chosen": "y", "rejected": "z"}], max_len=32)
    assert len(enc.prompt) + len(enc.chosen) <= 32 and enc.chosen[-1] == tiny_tokenizer.eos_id
    c, r = pair_logps(base, [enc], tiny_tokenizer.eos_id)
    assert c.shape == r.shape == (1,)


def test_read_pairs_errors(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    with pytest.raises(ValueError, match="rejected"):
        read_pairs(path)
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "a"}) + "\n")
    with pytest.raises(ValueError, match="no usable"):
        read_pairs(path)
    with pytest.raises(FileNotFoundError, match="mellum data preferences"):
        read_pairs(tmp_path / "none.jsonl")


def test_train_dpo_command(tiny_tokenizer, tmp_path):
    from mellum import load_pretrained, save_pretrained
    from mellum.cli import main

    base = tmp_path / "base"
    save_pretrained(_model(3), base)
    tiny_tokenizer.save(base)
    # The base model's record of how it was made (as a pre-trained or fine-tuned export carries it).
    (base / "training_config.json").write_text('{"name": "base-recipe"}')
    (base / "data_report.md").write_text("# data report\n")
    (base / "sft_log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"<fim_prefix>v{i} = <fim_middle>", "chosen": str(i),
                                         "rejected": f"'{i}'"}) + "\n" for i in range(10)))
    out = tmp_path / "run"
    assert main(["train", "dpo", "--model", str(base), "--pairs", str(pairs), "--out", str(out), "--max-steps", "2",
                 "--batch-size", "4", "--lr", "1e-3", "--beta", "0.2", "--heldout-fraction", "0.2", "--no-bar"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stage"] == "dpo" and summary["train_pairs"] == 8 and summary["heldout_pairs"] == 2
    assert summary["heldout_before"]["loss"] == pytest.approx(math.log(2))
    load_pretrained(out / "model")
    # The export keeps the base's lineage and adds this stage's log and command line.
    exported = {p.name: p for p in (out / "model").iterdir()}
    assert json.loads(exported["training_config.json"].read_text()) == {"name": "base-recipe"}
    assert exported["data_report.md"].read_text() == "# data report\n"
    assert exported["sft_log.jsonl"].read_text() == '{"step": 1, "loss": 2.0}\n'
    logged = [json.loads(line) for line in exported["dpo_log.jsonl"].read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2]
    args = json.loads(exported["dpo_args.json"].read_text())
    assert args["beta"] == 0.2 and args["max_steps"] == 2 and args["model"] == str(base)
    # An export onto the reference model (a model directory too) replaced it; now refused before training.
    reference = tmp_path / "reference"
    save_pretrained(_model(4), reference)
    tiny_tokenizer.save(reference)
    written = (reference / "model.safetensors").read_bytes()
    assert main(["train", "dpo", "--model", str(base), "--reference", str(reference), "--export", str(reference),
                 "--pairs", str(pairs), "--out", str(tmp_path / "run-ref"), "--max-steps", "1", "--no-bar"]) == 2
    assert (reference / "model.safetensors").read_bytes() == written and not (tmp_path / "run-ref").exists()


def test_post_training_starts_from_a_hub_id(tiny_tokenizer, tmp_path):
    """`--model` and `--reference` took only local directories (a hub id was "no model directory"): now a hub id is
    its snapshot (here from an offline hub cache), lineage included; an id that is nowhere fails before the run."""
    import subprocess
    import sys

    from mellum import load_pretrained, save_pretrained
    from tests.conftest import hub_cache

    base = tmp_path / "base"
    save_pretrained(_model(3), base)
    tiny_tokenizer.save(base)
    (base / "training_config.json").write_text('{"name": "base-recipe"}')
    env = hub_cache(tmp_path / "hub", base, "someone/base")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"<fim_prefix>v{i} = <fim_middle>", "chosen": str(i),
                                         "rejected": f"'{i}'"}) + "\n" for i in range(6)))

    def dpo(out, model="someone/base", reference="someone/base"):
        return subprocess.run([sys.executable, "-m", "mellum.cli", "train", "dpo", "--model", model, "--reference",
                               reference, "--pairs", str(pairs), "--out", str(out), "--max-steps", "1",
                               "--batch-size", "2", "--no-bar"], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=600)

    done = dpo(tmp_path / "run")
    assert done.returncode == 0, done.stderr
    load_pretrained(tmp_path / "run" / "model")
    assert json.loads((tmp_path / "run" / "model" / "training_config.json").read_text()) == {"name": "base-recipe"}
    for model, reference in (("someone/nothing", "someone/base"), ("someone/base", "someone/nothing")):
        failed = dpo(tmp_path / "missing", model, reference)
        assert failed.returncode == 2 and "could not be downloaded from the hub" in failed.stderr, failed.stderr
        assert "Traceback" not in failed.stderr and not (tmp_path / "missing").exists()


def test_resumed_dpo_reports_the_starting_policy_and_refuses_another_beta(tiny_tokenizer, tmp_path):
    pairs = [{"prompt": f"<fim_prefix>v{i} = <fim_middle>", "chosen": str(i), "rejected": f"'{i}'"} for i in range(6)]
    config = FinetuneConfig(max_steps=2, batch_size=2, micro_batch=2, max_len=64, eval_every=0, checkpoint_every=1,
                            optim=OptimConfig(lr=1e-3, weight_decay=0.0, muon=False), schedule=WSDSchedule(1, 0.5))
    first = train_dpo(_model(), tiny_tokenizer, pairs[:4], pairs[4:], config, out_dir=tmp_path, bar=False)
    assert first["heldout_before"]["loss"] == pytest.approx(math.log(2))  # the policy is its own reference
    longer = FinetuneConfig(**{**config.__dict__, "max_steps": 4})
    resumed = train_dpo(_model(), tiny_tokenizer, pairs[:4], pairs[4:], longer, out_dir=tmp_path, bar=False,
                        resume=True)
    assert resumed["steps"] == 4 and resumed["heldout_before"] == first["heldout_before"]
    assert resumed["heldout_after"]["reward_margin"] > first["heldout_after"]["reward_margin"]
    with pytest.raises(ValueError, match="beta: 0.1 → 0.5"):
        train_dpo(_model(), tiny_tokenizer, pairs[:4], pairs[4:], longer, DPOConfig(beta=0.5), out_dir=tmp_path,
                  bar=False, resume=True)
    # Another reference model changes the loss: it was resumed silently (`--reference` is not in the checkpoint).
    with pytest.raises(ValueError, match="reference: 'sha256"):
        train_dpo(_model(), tiny_tokenizer, pairs[:4], pairs[4:], longer, reference=_model(seed=7),
                  out_dir=tmp_path, bar=False, resume=True)
