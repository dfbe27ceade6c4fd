"""SFT: which tokens carry loss for FIM, Instruct and Thinking masking; held-out FIM loss falls; the command runs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from mellum.train.losses import IGNORE
from mellum.train.optim import OptimConfig
from mellum.train.schedule import WSDSchedule
from mellum.train.sft import (FimSFTConfig, FinetuneConfig, batch_indices, chat_examples, collate, fim_examples,
                              heldout_loss, read_chat_file, train_sft)
from tests.conftest import STDLIB

TRAIN_FILES = ["textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "heapq.py", "string.py"]
HELDOUT_FILES = ["copy.py", "colorsys.py"]
SMALL = FimSFTConfig(prefix_chars=600, suffix_chars=300, context_chars=800, context_files=2, samples_per_file=6)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/train/conftest.py


def _trained(tok, example) -> str:
    ids, mask = example
    return tok.decode([i for i, m in zip(ids, mask) if m])


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Name a sort."},
    {"role": "assistant", "content": "Merge sort.", "reasoning": "Any stable one."},
    {"role": "user", "content": "Another?"},
    {"role": "assistant", "content": "Heapsort.", "reasoning": "Not stable, in place."},
]


def test_instruct_masking_trains_every_assistant_turn(tiny_tokenizer):
    (example,) = chat_examples(CONVERSATION, tiny_tokenizer, "instruct")
    ids, mask = example
    text = tiny_tokenizer.decode(ids)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a sort.<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\nAny stable one.\n</think>\nMerge sort.<|im_end|>\n"
                    "<|im_start|>user\nAnother?<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\nNot stable, in place.\n</think>\nHeapsort.<|im_end|>\n")
    assert _trained(tiny_tokenizer, example) == ("<think>\nAny stable one.\n</think>\nMerge sort.<|im_end|>"
                                                 "<think>\nNot stable, in place.\n</think>\nHeapsort.<|im_end|>")
    # The assistant header is context (the serving prompt ends with it); the newline after <|im_end|> is never
    # generated (generation stops at <|im_end|>).
    end = tiny_tokenizer.id_of("<|im_end|>")
    for i, token in enumerate(ids):
        if token == end and i + 1 < len(ids):
            assert mask[i + 1] == 0
    assert mask[0] == 0 and mask[-1] == 0


def test_thinking_masking_unfolds_turns_and_trains_only_the_final_turn(tiny_tokenizer):
    first, second = chat_examples(CONVERSATION, tiny_tokenizer, "thinking")
    assert _trained(tiny_tokenizer, first) == "<think>\nAny stable one.\n</think>\nMerge sort.<|im_end|>"
    assert _trained(tiny_tokenizer, second) == "<think>\nNot stable, in place.\n</think>\nHeapsort.<|im_end|>"
    # Earlier assistant turns stay as context, without their reasoning.
    assert tiny_tokenizer.decode(second[0]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nName a sort.<|im_end|>\n"
        "<|im_start|>assistant\nMerge sort.<|im_end|>\n<|im_start|>user\nAnother?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nNot stable, in place.\n</think>\nHeapsort.<|im_end|>\n")
    # A final turn without reasoning still opens and closes an (empty) think block: the Thinking format.
    plain = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (only,) = chat_examples(plain, tiny_tokenizer, "thinking")
    assert _trained(tiny_tokenizer, only) == "<think>\n\n</think>\nhello<|im_end|>"
    # Special-token strings inside message text stay text (never control tokens).
    (tricky,) = chat_examples([{"role": "user", "content": "<|im_end|>"}, {"role": "assistant", "content": "ok"}],
                              tiny_tokenizer, "instruct")
    assert tricky[0].count(tiny_tokenizer.id_of("<|im_end|>")) == 2


def test_chat_input_errors(tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="masking"):
        chat_examples(CONVERSATION, tiny_tokenizer, "final")
    with pytest.raises(ValueError, match="unknown role"):
        chat_examples([{"role": "robot", "content": "x"}], tiny_tokenizer)
    bad = tmp_path / "chat.jsonl"
    bad.write_text(json.dumps({"messages": CONVERSATION}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"chat.jsonl:2"):
        read_chat_file(bad)
    with pytest.raises(FileNotFoundError):
        read_chat_file(tmp_path / "missing.jsonl")


def test_progress_bar_is_labelled_with_the_stage(capsys):
    """SFT, DPO and GRPO bars first showed "pretrain" (and "0 tok/s": fine-tuning counts no tokens)."""
    from mellum.train.sft import Finetuner

    model = torch.nn.Linear(2, 1)
    for stage in ("sft", "dpo", "grpo"):
        tuner = Finetuner(model, FinetuneConfig(max_steps=2, optim=OptimConfig(lr=1e-3, muon=False)), None, stage)
        tuner.step(lambda x: (model(x).square().sum(), {"loss": 1.0}), [torch.ones(1, 2)])
        tuner.metrics.close()
        err = capsys.readouterr().err
        assert f"{stage}:" in err and "pretrain" not in err and "tok/s" not in err, err


def test_fim_examples_train_the_syntactic_middle_only(tiny_tokenizer):
    from mellum.data.samples import syntactic_spans

    project = [(f"lib/{name}", (STDLIB / name).read_text(encoding="utf-8")) for name in ["textwrap.py", "shlex.py"]]
    examples = fim_examples(project, tiny_tokenizer, np.random.default_rng(0), SMALL, paths=["lib/textwrap.py"])
    assert len(examples) == SMALL.samples_per_file
    text = project[0][1]
    spans = {text[a:b] for a, b in syntactic_spans(text, "python", SMALL.min_middle_chars, SMALL.max_middle_chars)}
    for ids, mask in examples:
        # The mask is one contiguous run at the end: the middle and the end-of-text token.
        first = mask.index(1)
        assert all(mask[first:]) and not any(mask[:first])
        trained = tiny_tokenizer.decode(ids[first:])
        assert trained.endswith("<|endoftext|>")
        assert trained[: -len("<|endoftext|>")] in spans  # a syntactic unit of at most 700 characters
        prompt = tiny_tokenizer.decode(ids[:first])
        # Mellum layout: the other project file as context first, then the current file, SPM order.
        assert prompt.startswith("<filename>lib/shlex.py\n")  # the beginning of the other file, within budget
        context = prompt[len("<filename>lib/shlex.py\n"): prompt.index("<filename>lib/textwrap.py")]
        assert project[1][1].startswith(context) and 0 < len(context) <= SMALL.context_chars
        assert "<filename>lib/textwrap.py\n<fim_suffix>" in prompt and prompt.endswith("<fim_middle>")


def test_fim_examples_with_nearby_files_fit_the_budget_whole(tiny_tokenizer):
    """Path context at the default character budgets makes prompts of thousands of tokens; the example is fitted to
    `prompt_tokens` (the CLI's --max-len) by shrinking context and the file's prefix and suffix at lines, so it
    keeps the served layout (never `collate` cutting its beginning: a prompt starting inside a context file)."""
    project = [(f"lib/{name}", (STDLIB / name).read_text(encoding="utf-8"))
               for name in ["textwrap.py", "shlex.py", "fnmatch.py"]]
    text = project[0][1]
    for budget, middle_chars in ((480, 700), (160, 120)):  # room for the middle and the FIM skeleton
        config = FimSFTConfig(prompt_tokens=budget, max_middle_chars=middle_chars, samples_per_file=4)
        examples = fim_examples(project, tiny_tokenizer, np.random.default_rng(0), config, paths=["lib/textwrap.py"])
        assert len(examples) == 4
        for ids, mask in examples:
            assert len(ids) <= budget
            first = mask.index(1)
            assert all(mask[first:]) and not any(mask[:first])
            middle = tiny_tokenizer.decode(ids[first:])[: -len("<|endoftext|>")]
            prompt = tiny_tokenizer.decode(ids[:first])
            assert prompt.startswith("<filename>lib/")  # a whole header first, never the inside of a file
            assert prompt.count("<fim_suffix>") == prompt.count("<fim_prefix>") == 1
            head, fim = prompt.split("<filename>lib/textwrap.py\n<fim_suffix>")
            suffix, prefix = fim[: -len("<fim_middle>")].split("<fim_prefix>")
            at = text.index(prefix + middle + suffix)  # the file's own text around the middle, cut at lines
            assert (at == 0 or text[at - 1] == "\n") and (not suffix or suffix.endswith("\n"))
            assert len(prefix) + len(suffix) > 0
            if head:  # the nearest other file (by name at equal distance) is the one kept, last
                assert head.rsplit("<filename>", 1)[-1].startswith("lib/fnmatch.py\n")


def test_fim_examples_with_retrieved_context_fit_the_budget_and_find_the_definition(tiny_tokenizer):
    helpers = "\n\n".join(f"def unrelated_{i}(x):\n    return x + {i}\n" for i in range(40))
    shapes = helpers + "\n\ndef rectangle_area(width, height):\n    return width * height\n"
    user = ("from pkg.shapes import rectangle_area\n\n\n"
            "def room(plan):\n    total = 0\n    for w, h in plan:\n        total += rectangle_area(w, h)\n"
            "    return total\n")
    project = [("pkg/shapes.py", shapes), ("pkg/user.py", user), ("pkg/.env", "SECRET_KEY=rectangle_area\n")]
    config = FimSFTConfig(context="retrieval", prompt_tokens=160, samples_per_file=8, min_middle_chars=8)
    examples = fim_examples(project, tiny_tokenizer, np.random.default_rng(0), config, paths=["pkg/user.py"])
    assert examples
    for ids, mask in examples:
        assert len(ids) <= 160  # prompt, middle and end-of-text within the budget, to the token
        prompt = tiny_tokenizer.decode(ids[: mask.index(1)])
        assert prompt.endswith("<fim_middle>") and "SECRET_KEY" not in prompt  # secrets never become context
        # The definition the file uses is retrieved from the end of shapes.py (its beginning alone would miss it).
        assert "def rectangle_area(width, height)" in prompt
        assert prompt.index("<filename>pkg/shapes.py") < prompt.index("<filename>pkg/user.py")
    with pytest.raises(ValueError, match="context"):
        FimSFTConfig(context="nearby")


def test_collate_masks_targets_by_hand():
    batch = collate([([5, 6, 7, 8], [0, 0, 1, 1]), ([9, 10], [0, 1])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0]]
    assert batch["targets"].tolist() == [[IGNORE, 7, 8], [10, IGNORE, IGNORE]]
    # Too long: the trained end is kept.
    cut = collate([([1, 2, 3, 4, 5], [0, 0, 0, 1, 1])], pad_id=0, max_len=2)
    assert cut["input_ids"].tolist() == [[3, 4]] and cut["targets"].tolist() == [[4, 5]]


def test_batch_order_is_a_function_of_the_step():
    steps = [batch_indices(10, 4, s, seed=1) for s in range(5)]  # 20 indices = two epochs
    flat = [i for s in steps for i in s]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert batch_indices(10, 4, 3, seed=1) == steps[3]


def _project(names):
    return [(f"stdlib/{n}", (STDLIB / n).read_text(encoding="utf-8")) for n in names]


def test_sft_lowers_heldout_fim_loss_on_syntactic_middles(tiny_tokenizer):
    from mellum.config import get_config
    from mellum.model import Transformer

    project = _project(TRAIN_FILES + HELDOUT_FILES)
    rng = np.random.default_rng(0)
    train = fim_examples(project, tiny_tokenizer, rng, SMALL, paths=[f"stdlib/{n}" for n in TRAIN_FILES])
    heldout = fim_examples(project, tiny_tokenizer, rng, SMALL, paths=[f"stdlib/{n}" for n in HELDOUT_FILES])
    assert len(train) >= 30 and len(heldout) >= 8
    torch.manual_seed(0)
    model = Transformer(get_config("tiny-dense"))
    config = FinetuneConfig(max_steps=30, batch_size=8, micro_batch=8, max_len=384, eval_every=0,
                            optim=OptimConfig(lr=3e-3, weight_decay=0.0, muon=False), schedule=WSDSchedule(3, 0.3))
    summary = train_sft(model, tiny_tokenizer, train, heldout, config, bar=False)
    assert summary["heldout_loss_before"] == pytest.approx(6.93, abs=0.3)  # ≈ ln(1024) at initialisation
    assert summary["heldout_loss_after"] < summary["heldout_loss_before"] - 1.0, summary
    assert heldout_loss(model, heldout, tiny_tokenizer.eos_id, 8, 384) == pytest.approx(summary["heldout_loss_after"])


def test_train_sft_command_fim_and_chat(tiny_model_dir, tmp_path):
    from mellum import load_pretrained
    from mellum.cli import main
    from mellum.train.metrics import read_metrics

    base = tiny_model_dir  # read only: the run writes to its own --out
    project = tmp_path / "project"
    project.mkdir()
    for name in ["textwrap.py", "shlex.py", "bisect.py", "heapq.py"]:
        shutil.copy(STDLIB / name, project / name)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": CONVERSATION}) + "\n")
    out = tmp_path / "run"
    argv = ["train", "sft", "--model", str(base), "--source", str(project), "--chat", str(chat), "--masking",
            "thinking", "--out", str(out), "--max-steps", "3", "--batch-size", "4", "--micro-batch", "2",
            "--max-len", "256", "--lr", "1e-3", "--heldout-fraction", "0.25", "--no-bar", "--samples-per-file", "2"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["chat_examples"] == 2 and summary["heldout_examples"] > 0
    model = load_pretrained(out / "model")
    assert (out / "model" / "tokenizer.json").is_file()
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                      load_pretrained(base).state_dict().values()))
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r] == [1, 2, 3]
    # A second run into the same directory without --resume is refused; bad input is a user error.
    assert main(argv) == 2
    assert main(["train", "sft", "--model", str(base), "--out", str(tmp_path / "x")]) == 2
    # An export onto the base model, or onto a folder that is no model, would replace it: refused before training.
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "todo.txt").write_text("mine")
    for export in (base, base.parent, keep):
        assert main(argv[:argv.index("--out")] + ["--out", str(tmp_path / f"run-{export.name}"), "--export",
                                                 str(export)] + argv[argv.index("--out") + 2:]) == 2
        assert not (tmp_path / f"run-{export.name}" / "metrics.jsonl").exists()
    assert (keep / "todo.txt").read_text() == "mine" and (base / "config.json").is_file()


def test_resume_reproduces_the_uninterrupted_run(tiny_tokenizer, tmp_path):
    from mellum.config import get_config
    from mellum.model import Transformer
    from mellum.train import checkpointing

    examples = [e for _ in range(3) for e in chat_examples(CONVERSATION, tiny_tokenizer, "thinking")]
    config = FinetuneConfig(max_steps=4, batch_size=2, micro_batch=1, max_len=128, eval_every=0, checkpoint_every=2,
                            keep_checkpoints=2, optim=OptimConfig(lr=1e-3, weight_decay=0.0, muon=False),
                            schedule=WSDSchedule(1, 0.5))

    def model(seed=0):
        torch.manual_seed(seed)
        return Transformer(get_config("tiny-dense"))

    straight = model()
    train_sft(straight, tiny_tokenizer, examples, [], config, tmp_path / "a", bar=False)
    # Run b is "killed" after its step-2 checkpoint: roll its pointer back and resume into a fresh model.
    interrupted = model()
    train_sft(interrupted, tiny_tokenizer, examples, [], config, tmp_path / "b", bar=False)
    (tmp_path / "b" / "checkpoints" / "latest").write_text("step_000002\n")
    resumed = model(seed=1)  # other initial weights: only a real restore can end where the straight run ends
    summary = train_sft(resumed, tiny_tokenizer, examples, [], config, tmp_path / "b", bar=False, resume=True)
    assert summary["steps"] == 4
    assert checkpointing.latest_checkpoint(tmp_path / "b").name == "step_000004"
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_resumed_command_keeps_its_log_and_refuses_other_settings(tiny_model_dir, tmp_path, capsys):
    from mellum.cli import main
    from mellum.train.metrics import read_metrics

    project = tmp_path / "project"
    project.mkdir()
    for name in ["textwrap.py", "shlex.py", "bisect.py", "heapq.py"]:
        shutil.copy(STDLIB / name, project / name)
    out = tmp_path / "run"
    argv = ["train", "sft", "--model", str(tiny_model_dir), "--source", str(project), "--out", str(out),
            "--batch-size", "2", "--micro-batch", "2", "--max-len", "128", "--lr", "1e-3", "--heldout-fraction", "0.25",
            "--samples-per-file", "1", "--eval-every", "2", "--checkpoint-every", "2", "--no-bar"]
    assert main([*argv, "--max-steps", "2"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main([*argv, "--max-steps", "4", "--resume"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    log = read_metrics(out / "metrics.jsonl")
    # The log still holds the steps before the checkpoint, each step once; "before" is the starting model's loss.
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in log if "eval_loss" in r] == [0, 2, 4]
    assert resumed["heldout_loss_before"] == first["heldout_loss_before"] == log[0]["eval_loss"]
    assert resumed["heldout_loss_after"] == log[-1]["eval_loss"] != first["heldout_loss_after"]
    # Resuming the finished run writes no new checkpoint and logs nothing new.
    state = out / "checkpoints" / "step_000004" / "state.pt"
    written = state.stat().st_mtime_ns
    assert main([*argv, "--max-steps", "4", "--resume"]) == 0
    assert json.loads(capsys.readouterr().out) == resumed
    assert state.stat().st_mtime_ns == written and read_metrics(out / "metrics.jsonl") == log
    # Other optimisation settings, other data, or another stage's checkpoint: refused, with the difference named.
    assert main([*argv, "--max-steps", "6", "--resume", "--lr", "1e-2"]) == 2
    assert "optim.lr: 0.001 → 0.01" in capsys.readouterr().err
    assert main([*argv, "--max-steps", "6", "--resume", "--samples-per-file", "2"]) == 2
    assert "train_data" in capsys.readouterr().err
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"v{i} = ", "chosen": str(i), "rejected": "x"}) + "\n"
                             for i in range(4)))
    assert main(["train", "dpo", "--model", str(tiny_model_dir), "--pairs", str(pairs), "--out", str(out), "--resume",
                 "--batch-size", "2", "--micro-batch", "2", "--max-len", "128", "--lr", "1e-3", "--no-bar"]) == 2
    assert "stage: 'sft' → 'dpo'" in capsys.readouterr().err
    assert read_metrics(out / "metrics.jsonl") == log  # a refused resume leaves the run as it was
