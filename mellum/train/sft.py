"""Supervised fine-tuning: project-context FIM samples (loss on the middle) and chat samples (Instruct / Thinking).

Mellum (REFERENCE.md §1) fine-tunes its completion model on FIM samples whose middle is a syntactic unit (a function
or loop body, a statement) of at most ~700 characters, with other files of the same project as context. Mellum 2's
chat variants (REFERENCE.md §2) train Instruct with the loss on every assistant turn and Thinking with the loss on
the final assistant turn and its reasoning only, each multi-turn conversation unfolded into one sample per turn.

An example is `(ids, mask)`: token ids and a 0/1 mask saying which tokens are predicted (carry loss). The layout is
`mellum.prompt`'s (FIM) and the tokenizer's ChatML template (chat): what is trained is exactly what is served.
`Finetuner` is the optimisation loop shared by SFT, DPO and GRPO (optimizer groups, WSD schedule, metrics and
checkpoints of pre-training). Legend: B batch, T time, V vocabulary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mellum.prompt import ContextFile, get_format
from mellum.train import checkpointing
from mellum.train.losses import IGNORE
from mellum.train.records import read_jsonl
from mellum.train.metrics import Metrics
from mellum.train.optim import OptimConfig, build_optimizers, set_lr_factor
from mellum.train.pretrain import seed_everything
from mellum.train.schedule import WSDSchedule

Example = tuple[list[int], list[int]]  # (token ids, loss mask: 1 where the token is predicted)

MASKINGS = ("instruct", "thinking")
LANGUAGES = {".py": "python", ".js": "javascript", ".ts": "typescript", ".java": "java", ".kt": "kotlin", ".go": "go"}


# ---- project-context FIM samples -----------------------------------------------------------------------------
@dataclass(frozen=True)
class FimSFTConfig:
    """How project files become SFT samples: syntactic middles, nearby files as context, budgets in characters."""

    prompt_format: str = "mellum"
    max_middle_chars: int = 700  # Mellum paper: syntactic middles of at most ~700 characters
    min_middle_chars: int = 8
    prefix_chars: int = 3000  # the current file's prefix kept before the middle (cut at a line start)
    suffix_chars: int = 1500  # and its suffix after it (cut at a line end), as the serving packer trims them
    context_chars: int = 4000  # budget of other project files (their beginnings), nearest last (REFERENCE.md §1)
    context_files: int = 4
    samples_per_file: int = 4
    # "path": the beginnings of the nearest files (above); "retrieval": the serving packer (`mellum.context`: path,
    # imports, lexical and definition sources, reciprocal-rank fusion) over the project, the whole prompt within
    # `prompt_tokens` — samples then look exactly like the prompts the model is served.
    context: str = "path"
    prompt_tokens: int = 1024  # the whole example (prompt, middle, end-of-text), either context: the CLI's --max-len

    def __post_init__(self):
        if self.context not in ("path", "retrieval"):
            raise ValueError(f"context must be 'path' or 'retrieval', got {self.context!r}")


def _trim_prefix(prefix: str, chars: int) -> str:
    if len(prefix) <= chars:
        return prefix
    if chars <= 0:  # not prefix[-0:], the whole prefix
        return ""
    cut = prefix.find("\n", len(prefix) - chars)
    return prefix[cut + 1:] if cut >= 0 else prefix[-chars:]


def _trim_suffix(suffix: str, chars: int) -> str:
    if len(suffix) <= chars:
        return suffix
    cut = suffix.rfind("\n", 0, chars)
    return suffix[: cut + 1] if cut >= 0 else suffix[:chars]


def fim_examples(project: Sequence[tuple[str, str]], tokenizer, rng: np.random.Generator,
                 config: FimSFTConfig = FimSFTConfig(), paths: Iterable[str] | None = None) -> list[Example]:
    """SFT examples from one project [(path, text)]: for each file in `paths` (default all) up to
    `samples_per_file` distinct syntactic middles, the other files as context. Loss on the middle and the eos."""
    from mellum.data.samples import Sample, SegmentEncoder, encode_samples, render_segments, syntactic_spans

    fmt = get_format(config.prompt_format)
    encoder = SegmentEncoder(tokenizer)
    encoder.check_format(fmt)
    wanted = set(paths) if paths is not None else None
    samples = []
    with _packer(project, tokenizer, config) as packer:
        for path, text in project:
            if wanted is not None and path not in wanted:
                continue
            language = LANGUAGES.get(Path(path).suffix)
            spans = syntactic_spans(text, language, config.min_middle_chars, config.max_middle_chars) if language else []
            if not spans:
                continue
            chosen = rng.choice(len(spans), size=min(config.samples_per_file, len(spans)), replace=False)
            if packer is None:
                context = project_context(path, project, config.context_chars, config.context_files)
            for i in sorted(int(c) for c in chosen):
                start, end = spans[i]
                if packer is None:
                    # The whole example fits `prompt_tokens` (the CLI's --max-len): otherwise `collate` would cut
                    # its beginning, leaving a prompt that starts inside a context file, often without the current
                    # file's header or <fim_suffix> — a layout the model is never served.
                    middle = encoder.encode([("text", text[start:end]), ("literal", fmt.eos)])
                    prefix, suffix, kept = _fit_prompt(
                        fmt, encoder, path, _trim_prefix(text[:start], config.prefix_chars),
                        _trim_suffix(text[end:], config.suffix_chars), context, config.prompt_tokens - len(middle))
                    segments = render_segments(fmt, path, prefix, suffix, kept)
                else:  # the middle's tokens and the end-of-text come out of the prompt budget
                    budget = config.prompt_tokens - tokenizer.count(text[start:end]) - 1
                    packed = packer.pack(path, text[:start], text[end:], budget)
                    segments = render_segments(fmt, path, packed.prefix, packed.suffix, packed.context)
                target_from = len(segments)
                segments = segments + [("text", text[start:end]), ("literal", fmt.eos)]
                samples.append(Sample(segments, "sft", target_from))
    return [(ids, mask) for ids, mask in encode_samples(encoder, samples)] if samples else []


def _fit_prompt(fmt, encoder, path: str, prefix: str, suffix: str, context: Sequence[ContextFile],
                budget: int) -> tuple[str, str, list[ContextFile]]:
    """Prefix, suffix and context files whose rendered prompt fits `budget` tokens: the current file's prefix and
    suffix shrink first (by at least a quarter at a time, cut at lines) until the FIM section alone fits, then
    context files are added nearest first while they fit, the first one that does not cut at a line end to what is
    left (the order of importance of the serving packer: the cursor's own file, then the nearest files)."""
    from mellum.data.samples import render_segments

    def count(p: str, s: str, files: Sequence[ContextFile]) -> int:
        return len(encoder.encode(render_segments(fmt, path, p, s, files)))

    # Each cut keeps at most 3/4, and less when the token count says more must go (tokens ~ characters).
    used = count(prefix, suffix, [])
    while (prefix or suffix) and used > budget:
        keep = min(0.75, max(budget, 0) / used)
        prefix, suffix = _trim_prefix(prefix, int(len(prefix) * keep)), _trim_suffix(suffix, int(len(suffix) * keep))
        used = count(prefix, suffix, [])
    kept: list[ContextFile] = []  # farthest first, nearest last, as `project_context` returns them
    for f in reversed(context):
        piece, base = f.text, used
        used = count(prefix, suffix, [ContextFile(f.path, piece)] + kept)
        while piece.strip() and used > budget:
            piece = _trim_suffix(piece, int(len(piece) * min(0.75, max(budget - base, 0) / (used - base))))
            used = count(prefix, suffix, [ContextFile(f.path, piece)] + kept)
        if not piece.strip():
            break
        kept.insert(0, ContextFile(f.path, piece))
        if piece != f.text:
            break
    return prefix, suffix, kept


@contextlib.contextmanager
def _packer(project: Sequence[tuple[str, str]], tokenizer, config: FimSFTConfig):
    """The serving packer over an in-memory index of `project` (files as editor buffers under an empty root,
    so the index's rules apply: secret-looking and generated files never become context), or None for "path"."""
    if config.context != "retrieval":
        yield None
        return
    from mellum.context import ContextConfig, ContextPacker, ProjectIndex
    from mellum.context.repobench import SETTING_SOURCES

    # The sources of repo-bench's "retrieval" setting: what the model is trained with is what it is scored with.
    settings = ContextConfig(prompt_format=config.prompt_format, window_tokens=config.prompt_tokens + 1,
                             max_new_tokens=0, stable_order=False, sources=SETTING_SOURCES["retrieval"])
    with tempfile.TemporaryDirectory(prefix="mellum-sft-index-") as root:
        index = ProjectIndex(root, settings)
        for path, text in project:
            index.update(path, text)
        yield ContextPacker.for_tokenizer(index, tokenizer, settings)  # counted as the prompt is encoded


def project_context(path: str, project: Sequence[tuple[str, str]], budget_chars: int,
                    max_files: int) -> list[ContextFile]:
    """Other files of the project, nearest (by directory hops) first into the budget, each cut at a line end to
    what is left of it; returned farthest first, nearest last (the Mellum layout, REFERENCE.md §1)."""
    from mellum.data.samples import path_distance

    others = sorted((f for f in project if f[0] != path), key=lambda f: (path_distance(path, f[0]), f[0]))
    chosen, left = [], budget_chars
    for other, text in others[:max_files]:
        if left <= 0:
            break
        piece = _trim_suffix(text, left)
        if piece.strip():
            chosen.append(ContextFile(other, piece))
            left -= len(piece)
    return chosen[::-1]


def read_project(root: str | os.PathLike, max_file_chars: int = 200_000) -> list[tuple[str, str]]:
    """The source files of a project directory [(relative path, text)], sorted; hidden folders skipped."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"no project directory at {root}")
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") or part in ("__pycache__", "node_modules") for part in rel.parts):
            continue
        if path.suffix not in LANGUAGES or not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if 0 < len(text) <= max_file_chars:
            files.append((rel.as_posix(), text))
    return files


def read_corpus_projects(corpus: str | os.PathLike) -> dict[str, list[tuple[str, str]]]:
    """The files of a corpus built by `mellum data build` (permissively licensed, filtered, deduplicated), grouped
    by project: {project: [(path, text)]}."""
    from mellum.data.corpus import read_corpus

    projects: dict[str, list[tuple[str, str]]] = {}
    for record in read_corpus(corpus):
        if Path(record["path"]).suffix in LANGUAGES:
            projects.setdefault(record.get("project") or "", []).append((record["path"], record["text"]))
    return {k: sorted(v) for k, v in sorted(projects.items())}


def pick_files(projects: dict[str, list[tuple[str, str]]], max_files: int | None, seed: int) -> dict[str, set[str]]:
    """A seeded subset of at most `max_files` files over all projects: {project: {paths}}."""
    every = [(name, path) for name, files in projects.items() for path, _ in files]
    if max_files is not None and len(every) > max_files:
        keep = np.random.default_rng(seed).choice(len(every), size=max_files, replace=False)
        every = [every[int(i)] for i in sorted(keep)]
    picked: dict[str, set[str]] = {}
    for name, path in every:
        picked.setdefault(name, set()).add(path)
    return picked


# ---- chat samples ---------------------------------------------------------------------------------------------
def _check_messages(messages: Sequence[dict]) -> None:
    if not messages:
        raise ValueError("a conversation needs at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be an object with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"message {i} has unknown role {m['role']!r} (system, user, assistant, tool)")


def _chat_pieces(messages: Sequence[dict], trained: Sequence[bool], reasoning: Sequence[bool]) -> list[tuple[str, str, bool]]:
    """ChatML (`mellum.tokenizer.CHAT_TEMPLATE`) as (kind, string, trained) pieces. An assistant message's body
    (its `<think>` block when shown, its content) and its `<|im_end|>` are trained when `trained[i]`; headers,
    other roles and the newline after `<|im_end|>` never are (generation stops at `<|im_end|>`)."""
    pieces: list[tuple[str, str, bool]] = []
    for i, m in enumerate(messages):
        train = trained[i]
        pieces += [("special", "<|im_start|>", False), ("text", f"{m['role']}\n", False)]
        if reasoning[i]:
            pieces += [("special", "<think>", train), ("text", "\n" + (m.get("reasoning") or "") + "\n", train),
                       ("special", "</think>", train), ("text", "\n", train)]
        pieces += [("text", m["content"], train), ("special", "<|im_end|>", train), ("text", "\n", False)]
    return pieces


def _encode_pieces(tokenizer, pieces: Sequence[tuple[str, str, bool]]) -> Example:
    """Encode maximal runs of text with the same `trained` flag (special strings inside text stay text)."""
    ids: list[int] = []
    mask: list[int] = []
    run, run_flag = "", None
    for kind, s, flag in list(pieces) + [("end", "", None)]:
        if kind == "text" and (flag == run_flag or not run):
            run, run_flag = run + s, flag
            continue
        if run:
            encoded = tokenizer.encode(run, allow_special=False)
            ids += encoded
            mask += [int(bool(run_flag))] * len(encoded)
            run, run_flag = "", None
        if kind == "special":
            ids.append(tokenizer.id_of(s))
            mask.append(int(flag))
        elif kind == "text":
            run, run_flag = s, flag
    return ids, mask


def chat_examples(messages: Sequence[dict], tokenizer, masking: str = "instruct") -> list[Example]:
    """Examples of one conversation [{"role", "content", "reasoning"?}].

    instruct: one example, loss on every assistant turn (content + `<|im_end|>`; reasoning shown where given).
    thinking: one example per assistant turn, ending at it; loss on that final turn with its `<think>` block only.
    Earlier assistant turns appear without their reasoning, as a Thinking model sees its history at serving time
    (Mellum 2 report; the same convention as Qwen3's chat template).
    """
    if masking not in MASKINGS:
        raise ValueError(f"masking must be one of {MASKINGS}, got {masking!r}")
    _check_messages(messages)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not assistant:
        return []
    if masking == "instruct":
        trained = [m["role"] == "assistant" for m in messages]
        reasoning = [bool(m.get("reasoning")) and m["role"] == "assistant" for m in messages]
        return [_encode_pieces(tokenizer, _chat_pieces(messages, trained, reasoning))]
    out = []
    for last in assistant:
        turn = messages[: last + 1]
        trained = [i == last for i in range(len(turn))]
        shown = [i == last for i in range(len(turn))]  # only the final turn shows its think block (maybe empty)
        out.append(_encode_pieces(tokenizer, _chat_pieces(turn, trained, shown)))
    return out


def read_chat_file(path: str | os.PathLike) -> list[list[dict]]:
    """Conversations from JSONL: each line {"messages": [...]} (or a bare list of messages)."""
    conversations = []
    for where, _, record in read_jsonl(path, "no chat data", objects=False):
        messages = record.get("messages") if isinstance(record, dict) else record
        if not isinstance(messages, list):
            raise ValueError(f"{where}: expected {{\"messages\": [...]}}")
        try:
            _check_messages(messages)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        conversations.append(messages)
    if not conversations:
        raise ValueError(f"{path} holds no conversations")
    return conversations


# ---- batches and losses ----------------------------------------------------------------------------------------
def collate(examples: Sequence[Example], pad_id: int, max_len: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded next-token batch: input_ids [B, T] and targets [B, T] (IGNORE where nothing is predicted).
    Examples longer than `max_len + 1` tokens keep their last `max_len + 1` (the trained end)."""
    rows = []
    for ids, mask in examples:
        if max_len is not None and len(ids) > max_len + 1:
            ids, mask = ids[-(max_len + 1):], mask[-(max_len + 1):]
        rows.append((ids, mask))
    width = max(len(ids) for ids, _ in rows) - 1
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, T]
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)  # [B, T]
    for b, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        ids_t = torch.tensor(ids, dtype=torch.long)
        inputs[b, :n] = ids_t[:-1]
        keep = torch.tensor(mask[1:], dtype=torch.bool)
        targets[b, :n] = ids_t[1:].masked_fill(~keep, IGNORE)
    return {"input_ids": inputs, "targets": targets}


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(target) per position [B, T] from logits [B, T, V] (0 where the target is IGNORE), in fp32."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # [B, T, V]
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, T]
    return picked.masked_fill(targets == IGNORE, 0.0)


def sft_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy over trained tokens, their count) of one batch."""
    logits = model(batch["input_ids"]).logits  # [B, T, V]
    targets = batch["targets"]
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, (targets != IGNORE).sum()


@torch.no_grad()
def heldout_loss(model, examples: Sequence[Example], pad_id: int, batch_size: int = 8,
                 max_len: int | None = None) -> float:
    """Mean cross-entropy per trained token over `examples` (e.g. held-out middles)."""
    if not examples:
        raise ValueError("no held-out examples to evaluate")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id, max_len).items()}
        loss, n = sft_loss_sum(model, batch)
        total, count = total + loss.item(), count + int(n)
    model.train(was_training)
    return total / max(count, 1)


# ---- the fine-tuning loop (shared by SFT, DPO and GRPO) ---------------------------------------------------------
@dataclass
class FinetuneConfig:
    """Optimisation of a post-training stage. Fine-tuning defaults: AdamW everywhere, a low LR, short warm-up,
    linear decay over the last 20% (WSD, as in pre-training)."""

    max_steps: int = 100
    batch_size: int = 8  # examples (SFT), pairs (DPO) or prompts (GRPO) per optimizer step
    micro_batch: int = 8  # examples per forward/backward (gradient accumulation up to batch_size)
    max_len: int = 1024  # tokens per example (longer ones keep their end)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-4, weight_decay=0.0, muon=False))
    schedule: WSDSchedule = field(default_factory=lambda: WSDSchedule(warmup_steps=10, decay_fraction=0.2))
    seed: int = 0
    eval_every: int = 50
    checkpoint_every: int = 0  # 0: only the final state
    keep_checkpoints: int = 1
    log_every: int = 1
    device: str = "cpu"

    def __post_init__(self):
        if self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        if self.batch_size <= 0 or self.micro_batch <= 0:
            raise ValueError("batch_size and micro_batch must be positive")


class Finetuner:
    """Optimizers, LR schedule, metrics and checkpoints around a model; the stage supplies the loss.

    `step(loss_fn, micro_batches)` runs one optimizer step: `loss_fn(micro_batch)` returns (loss, metrics) where
    the losses of the step's micro-batches add up to the step's objective (the stage divides by its global count).
    With `resume`, the newest checkpoint under OUT is restored first (same data order: batches are a function of
    the step); one written by another stage or with other `settings` (the stage's data, its loss settings) or
    other optimisation settings is refused. The metrics log keeps its lines up to the restored step.
    """

    def __init__(self, model, config: FinetuneConfig, out_dir: str | os.PathLike | None, name: str, bar: bool = True,
                 resume: bool = False, settings: dict | None = None):
        self.model, self.config, self.name = model, config, name
        self.out = Path(out_dir) if out_dir is not None else None
        self.optimizers = build_optimizers(model, config.optim)
        self.step_count = 0
        self.settings = {"stage": name, "batch_size": config.batch_size, "max_len": config.max_len,
                         "seed": config.seed, "optim": dataclasses.asdict(config.optim),
                         "schedule": dataclasses.asdict(config.schedule), **(settings or {})}
        self._saved_step = None  # the step of the newest checkpoint written or restored
        if resume:
            self._restore()
        self.metrics = Metrics(self.out, config.max_steps, name, resume_step=self.step_count, bar=bar)
        self._start = time.perf_counter()

    def step(self, loss_fn: Callable, micro_batches: Sequence) -> dict:
        cfg = self.config
        lr = set_lr_factor(self.optimizers, cfg.schedule.factor(self.step_count, self.step_count / cfg.max_steps))
        self.model.train()
        totals: dict[str, float] = {}
        for mb in micro_batches:
            loss, parts = loss_fn(mb)
            loss.backward()
            for k, v in parts.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        self.step_count += 1
        record = {**totals, "lr": lr, "grad_norm": float(grad_norm)}
        if self.step_count % cfg.log_every == 0 or self.step_count == cfg.max_steps:
            self.log(**record)
        main = next(iter(totals.values()), 0.0)
        elapsed = time.perf_counter() - self._start
        self.metrics.progress(self.step_count, main, None, self.step_count / cfg.max_steps, elapsed)
        if self.out is not None and cfg.checkpoint_every and self.step_count % cfg.checkpoint_every == 0:
            self.save()
        return record

    def log(self, **values) -> None:
        self.metrics.log(self.step_count, **values)

    def save(self) -> Path | None:
        """A checkpoint (model, optimizers, step, settings, RNG) under OUT/checkpoints, written atomically; none when
        the newest one already holds this step."""
        if self.out is None or self._saved_step == self.step_count:
            return None
        path = checkpointing.save_checkpoint(self.out, self.model, self.optimizers,
                                             {"step": self.step_count, "settings": self.settings},
                                             {"step": self.step_count}, {"stage": self.name},
                                             keep=self.config.keep_checkpoints)
        self._saved_step = self.step_count
        return path

    def _restore(self) -> bool:
        path = checkpointing.latest_checkpoint(self.out) if self.out is not None else None
        if path is None:
            return False
        trainer_state, _ = checkpointing.load_checkpoint(path, self.model, self.optimizers, check=self._check_resumable)
        self.step_count = self._saved_step = int(trainer_state["step"])
        return True

    def _check_resumable(self, trainer_state: dict) -> None:
        checkpointing.refuse_changed_settings(trainer_state.get("settings"), self.settings, self.out)

    def close(self) -> None:
        self.metrics.close()


def export_model(model, directory: str | os.PathLike, tokenizer=None, dtype: str = "float32",
                 extra_files: dict[str, str] | None = None) -> Path:
    """Write the model (and tokenizer) in the Hugging Face format; into a temporary folder renamed into place, so
    an interrupted export never leaves a half-written model where a previous one stood."""
    from mellum.checkpoint import save_pretrained

    directory = Path(directory)
    tmp = directory.with_name(directory.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_pretrained(model, tmp, dtype=getattr(torch, dtype))
    if tokenizer is not None:
        tokenizer.save(tmp)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text, encoding="utf-8")
    if directory.exists():
        old = directory.with_name(directory.name + f".old{os.getpid()}")
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)
    return directory


def data_fingerprint(items: Sequence) -> str:
    """"N items, sha256 …" of a stage's training data (lists of token ids): a resumed run must see the same data."""
    digest = hashlib.sha256()
    for item in items:  # one item at a time: a large dataset's whole repr would be a string of gigabytes
        digest.update(repr(item).encode())
        digest.update(b"\n")
    return f"{len(items)} items, sha256 {digest.hexdigest()[:16]}"


def weights_fingerprint(model) -> str:
    """"sha256 …" of a model's weights, sampled (each tensor's name, shape and its first and last 512 values): two
    different models differ there, and hashing every byte of a 4B model would take as long as a training step."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = torch.cat([flat[:512], flat[-512:]]).to("cpu", torch.float32)
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return f"sha256 {digest.hexdigest()[:16]}"


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of optimizer step `step`: epochs of seeded permutations, so a resumed run sees the same data."""
    out = []
    position = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(position, n)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        take = min(batch_size - len(out), n - offset)
        out += [int(i) for i in order[offset:offset + take]]
        position += take
    return out


# ---- the SFT stage -----------------------------------------------------------------------------------------------
def train_sft(model, tokenizer, train: Sequence[Example], heldout: Sequence[Example], config: FinetuneConfig,
              out_dir: str | os.PathLike | None = None, bar: bool = True, resume: bool = False) -> dict:
    """Fine-tune `model` in place on `train` examples (masked next-token loss); held-out loss before and after."""
    if not train:
        raise ValueError("no SFT training examples: check the sources (supported files: "
                         f"{', '.join(sorted(LANGUAGES))}) or the chat file")
    seed_everything(config.seed)
    device = torch.device(config.device)
    model.to(device)
    pad = tokenizer.eos_id
    before = heldout_loss(model, heldout, pad, config.micro_batch, config.max_len) if heldout else None  # the start
    tuner = Finetuner(model, config, out_dir, "sft", bar=bar, resume=resume,
                      settings={"train_data": data_fingerprint(train)})
    if before is not None and tuner.step_count == 0:
        tuner.log(eval_loss=before)

    def loss_fn(chunk):
        loss, _ = sft_loss_sum(model, chunk["batch"])
        return loss / chunk["count"], {"loss": loss.item() / chunk["count"]}

    start = tuner.step_count
    try:
        while tuner.step_count < config.max_steps:
            picked = [train[i] for i in batch_indices(len(train), config.batch_size, tuner.step_count, config.seed)]
            chunks = [collate(picked[i:i + config.micro_batch], pad, config.max_len)
                      for i in range(0, len(picked), config.micro_batch)]
            count = max(1, sum(int((c["targets"] != IGNORE).sum()) for c in chunks))  # trained tokens in the step
            chunks = [{"batch": {k: v.to(device) for k, v in c.items()}, "count": count} for c in chunks]
            tuner.step(loss_fn, chunks)
            if heldout and config.eval_every and tuner.step_count % config.eval_every == 0 \
                    and tuner.step_count < config.max_steps:
                tuner.log(eval_loss=heldout_loss(model, heldout, pad, config.micro_batch, config.max_len))
        after = heldout_loss(model, heldout, pad, config.micro_batch, config.max_len) if heldout else None
        if after is not None and tuner.step_count != start:  # a finished run resumed has logged it
            tuner.log(eval_loss=after)
        tuner.save()
    finally:
        tuner.close()
    return {"steps": tuner.step_count, "train_examples": len(train), "heldout_examples": len(heldout),
            "heldout_loss_before": before, "heldout_loss_after": after}


def split_by_path(paths: Sequence[str], heldout_fraction: float, seed: int = 0) -> tuple[set[str], set[str]]:
    """Deterministic split of file paths into (train, held-out): held-out files are never trained on."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout fraction must be in [0, 1), got {heldout_fraction}")
    order = sorted(paths)
    rng = np.random.default_rng(seed)
    rng.shuffle(order)
    n_held = int(round(len(order) * heldout_fraction))
    if heldout_fraction > 0 and n_held == 0 and len(order) > 1:
        n_held = 1
    return set(order[n_held:]), set(order[:n_held])

