"""The completion service: request → context → prompt → token healing → engine → stop strings → filters → result.

It sees strings and never speaks a protocol (ARCHITECTURE.md): the LSP and HTTP servers call `complete` or
`stream`. One service answers concurrent requests from many threads: the engine's `generate` is thread-safe,
the token-healing table is built once per tokenizer under a lock, and each project's context packer (its index
and its memory of the last prompt's order) is used under that project's lock — context packing of two requests
in one project is serialised, generation is not.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import queue
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from mellum.postprocess import Cursor, Pipeline, is_multiline, pipeline
from mellum.prompt import ContextFile, PromptFormat, get_format


@dataclass
class CompletionRequest:
    """One completion at a cursor: the file's text before (`prefix`) and after (`suffix`) it, plus context.

    `project_root` lets the context packer index that project for context; `open_files` are editor buffers
    ({path: text}, most recently focused first); `extra_context` are pieces the client chose, most relevant
    first. `multiline` forces single/multi-line (None: decided from the cursor position); `stop` adds stop
    strings; `deadline_ms` bounds the whole request; `return_prompt` puts the exact prompt text in the result.
    """

    path: str
    prefix: str
    suffix: str = ""
    project_root: str | None = None
    extra_context: list[ContextFile] = field(default_factory=list)
    open_files: dict[str, str] = field(default_factory=dict)
    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    multiline: bool | None = None
    stop: list[str] = field(default_factory=list)
    deadline_ms: float | None = None
    return_prompt: bool = False

    def __post_init__(self):
        if not isinstance(self.path, str) or not self.path:
            raise ValueError("the request needs the path of the file being completed (a non-empty string)")
        if not isinstance(self.prefix, str) or not isinstance(self.suffix, str):
            raise ValueError("prefix and suffix must be strings")
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.deadline_ms is not None and not self.deadline_ms > 0:
            raise ValueError(f"deadline_ms must be > 0, got {self.deadline_ms!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        for piece in self.extra_context:
            if not isinstance(piece, ContextFile):
                raise ValueError(f"extra_context takes ContextFile(path, text) items, got {type(piece).__name__}")


@dataclass
class Completion:
    """The answer: `text` to insert at the cursor, and what it cost.

    `stop_reason` is the engine's ("stop", "length", "lines", "deadline", "cancelled", "context") or "filter"
    (the post-processing filters ended the block) or "stop_string". `truncated` says the window could not hold
    the file and the client's context: some of that context, or of the file far from the cursor, was left out
    (not set when the file alone would fit and only the packer's shares trimmed it, for project context).
    `raw_text` is the model's output before post-processing; `healed` the text backed off the prefix for token
    healing; `tokens` the generated ids.
    """

    id: str
    text: str
    prompt: str | None
    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    stop_reason: str
    timings_ms: dict[str, float]
    truncated: bool = False
    multiline: bool = False
    raw_text: str = ""
    healed: str = ""
    context_paths: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # generated ids (telemetry, debugging)


@dataclass
class ServiceConfig:
    """Budgets of the completion service (tokens unless named otherwise)."""

    max_new_tokens: int = 64  # default when the request does not say
    max_lines: int = 24  # a multi-line completion ends after this many lines
    token_healing: bool = True
    heal_tokens: int = 1  # prefix tokens backed off at most
    max_healing_ids: int | None = None  # skip healing when more ids would be allowed (remote backends' logit_bias caps)
    suffix_share: float = 0.25  # when the cursor's file alone overflows the window, the suffix keeps at most this
    early_stop: bool = True  # stop decoding as soon as the filters have cut the block
    stream_holdback_lines: int = 2  # complete lines kept back while streaming, in case the filters cut them


def newline_ids(tokenizer) -> list[int]:
    """Ids whose text contains a newline: the engine counts lines with them (`SamplingParams.max_lines`)."""
    return [i for i, s in enumerate(tokenizer.token_strings) if "\n" in s and i not in tokenizer.special_ids]


class HealingTable:
    """Token strings sorted for the two token-healing queries: ids whose text starts with a string, and ids
    whose text is a prefix of it. Built once per tokenizer (`healing_table`)."""

    def __init__(self, tokenizer):
        special = tokenizer.special_ids
        pairs = sorted((s, i) for i, s in enumerate(tokenizer.token_strings) if s and i not in special)
        self.strings = [s for s, _ in pairs]
        self.ids = [i for _, i in pairs]
        self.by_string: dict[str, list[int]] = {}
        for s, i in pairs:
            self.by_string.setdefault(s, []).append(i)

    def extending(self, text: str) -> list[int]:
        """Ids whose text starts with `text` (a contiguous run of the sorted strings)."""
        lo = bisect.bisect_left(self.strings, text)
        hi = bisect.bisect_left(self.strings, text + "\U0010ffff", lo)  # past every string starting with `text`
        return self.ids[lo:hi]

    def prefixes(self, text: str) -> list[int]:
        """Ids whose text is a non-empty proper prefix of `text`."""
        return [i for n in range(1, len(text)) for i in self.by_string.get(text[:n], ())]


class HealingConstraint:
    """Token healing's constraint on the first generated tokens (`SamplingParams.allowed_next`): until the output
    has re-typed the healed text, each token must either start with what remains of it or be a prefix of that
    remainder. The first token alone is not enough: after a prefix token (`\n    ` of a healed `\n        `) an
    unconstrained model may continue with other text (`return`, four spaces short), and the completion is lost.
    None once the healed text is covered (or the output diverged, which the service reports), or when a set is
    larger than `cap` (remote backends' `logit_bias` limits)."""

    def __init__(self, table: HealingTable, strings: Sequence[str], healed: str, cap: int | None = None):
        self.table, self.strings, self.healed, self.cap = table, strings, healed, cap

    def __call__(self, generated: tuple[int, ...]) -> tuple[int, ...] | None:
        done = "".join(self.strings[i] for i in generated)
        if len(done) >= len(self.healed) or not self.healed.startswith(done):
            return None
        remaining = self.healed[len(done):]
        allowed = tuple(sorted(set(self.table.extending(remaining)) | set(self.table.prefixes(remaining))))
        if not allowed or (self.cap is not None and len(allowed) > self.cap):
            return None
        return allowed


_TABLES: "weakref.WeakKeyDictionary[object, HealingTable]" = weakref.WeakKeyDictionary()
_TABLES_LOCK = threading.Lock()


def healing_table(tokenizer) -> HealingTable:
    with _TABLES_LOCK:
        table = _TABLES.get(tokenizer)
        if table is None:
            table = _TABLES[tokenizer] = HealingTable(tokenizer)
        return table


@dataclass
class Prompt:
    """A prompt as token ids in three parts (head | prefix | tail) so healing and truncation can edit one part."""

    head: list[int]
    prefix: list[int]
    tail: list[int]
    prefix_text: str
    suffix_text: str
    context: list[ContextFile]
    truncated: bool
    healed: str = ""
    allowed_next: "Callable[[tuple[int, ...]], tuple[int, ...] | None] | None" = None  # healing's constraint

    @property
    def ids(self) -> list[int]:
        return self.head + self.prefix + self.tail


class _Either(threading.Event):
    """Set when either this event or the caller's cancel event is: lets the service stop the engine early."""

    def __init__(self, other: threading.Event | None):
        super().__init__()
        self._other = other

    def is_set(self) -> bool:
        return super().is_set() or (self._other is not None and self._other.is_set())


class CompletionService:
    """Completes code at a cursor with a model; thread-safe (see the module docstring)."""

    def __init__(self, engine, tokenizer=None, model_config=None, config: ServiceConfig | None = None,
                 context_config=None, postprocess: Pipeline | None = None):
        """`engine` is a backend (`NativeEngine`, `OpenAIEngine`, ...) used with `tokenizer` and `model_config`, or
        a model directory, loaded as by `from_pretrained` on the CPU."""
        if isinstance(engine, (str, os.PathLike)):
            if tokenizer is not None or model_config is not None:
                raise ValueError("pass either a model directory or an engine with its tokenizer and config")
            loaded = CompletionService.from_pretrained(engine)
            engine, tokenizer, model_config = loaded.engine, loaded.tokenizer, loaded.model_config
        if tokenizer is None or model_config is None:
            raise ValueError("an engine needs its tokenizer and model config (or pass a model directory)")
        self.engine, self.tokenizer, self.model_config = engine, tokenizer, model_config
        self.config = config or ServiceConfig()
        self.context_config = context_config
        self.postprocess = postprocess or pipeline()
        self.format: PromptFormat = get_format(model_config.prompt_format)
        if tokenizer.vocab_size > model_config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                             f"{model_config.vocab_size}: they do not belong together")
        self.window = int(getattr(engine, "max_len", None) or model_config.max_position_embeddings)
        ids = {tokenizer.token_to_id(s) for s in self.format.stop} | {tokenizer.eos_id}
        self.stop_ids = tuple(sorted(i for i in ids if i is not None))
        self._has_newline_ids = bool(getattr(engine, "newline_ids", None))
        self._packers: dict[str | None, tuple[object, threading.Lock]] = {}
        self._packers_lock = threading.Lock()
        if self.config.token_healing:
            healing_table(tokenizer)  # built now (≈0.1 s for 98k tokens), not in the first request's latency

    @classmethod
    def from_pretrained(cls, model_dir, device: str = "cpu", quantize: str | None = None, compile: bool = False,
                        config: ServiceConfig | None = None, context_config=None, **engine_options):
        """Load the model and the tokenizer saved beside it, and start a native engine on `device`."""
        from mellum.checkpoint import model_directory
        from mellum.engine import NativeEngine
        from mellum.tokenizer import Tokenizer

        model_dir = model_directory(model_dir)  # a hub id is downloaded (or found in the hub cache)
        tokenizer = Tokenizer.from_pretrained(model_dir)
        engine = NativeEngine.from_pretrained(model_dir, device=device, quantize=quantize, compile=compile,
                                              newline_ids=newline_ids(tokenizer), **engine_options)
        return cls(engine, tokenizer, engine.config, config, context_config)

    @classmethod
    def from_remote(cls, model_dir, base_url: str, model: str | None = None, api_key: str | None = None,
                    config: ServiceConfig | None = None, context_config=None, timeout_s: float = 60.0):
        """A service whose engine is an OpenAI-compatible server (vLLM, llama.cpp's llama-server) serving the model
        of `model_dir`; only its config.json and tokenizer are read here. `model`: the name the server knows it by
        (default: the directory's name). Token healing asks at most 300 ids of `logit_bias` (OpenAI's cap)."""
        from mellum.checkpoint import load_config
        from mellum.engine import OpenAIEngine
        from mellum.tokenizer import Tokenizer

        model_dir = Path(model_dir)
        model_config = load_config(model_dir)
        tokenizer = Tokenizer.from_pretrained(model_dir)
        engine = OpenAIEngine(base_url, model or model_dir.name, api_key=api_key, newline_ids=newline_ids(tokenizer),
                              encode=tokenizer.encode, timeout_s=timeout_s, vocab_size=model_config.vocab_size)
        if config is None:
            config = ServiceConfig(max_healing_ids=300)
        return cls(engine, tokenizer, model_config, config, context_config)

    def close(self) -> None:
        self.engine.close()

    # ---- public interface -------------------------------------------------------------------------------
    def complete(self, request: CompletionRequest, cancel: threading.Event | None = None) -> Completion:
        """Run one request to the end and return the post-processed completion."""
        run = self._run(request, cancel, streaming=False)
        while True:
            try:
                next(run)
            except StopIteration as done:
                return done.value

    def stream(self, request: CompletionRequest, cancel: threading.Event | None = None) -> Iterator[str]:
        """Yield the completion's text in pieces as the model writes it; the generator's return value (the
        `StopIteration.value`) is the final `Completion`, whose text is exactly the yielded pieces joined.

        A line is yielded once `stream_holdback_lines` more lines are complete and the filters still keep it
        (its newline goes out with the next line), so pieces almost never need taking back; if the filters
        later cut into yielded text (a long repeated block), the completion keeps what was yielded. Closing
        the generator early cancels the request.
        """
        return (yield from self._run(request, cancel, streaming=True))

    def _run(self, request: CompletionRequest, cancel: threading.Event | None, streaming: bool):
        t0 = time.perf_counter()
        cursor = Cursor(request.prefix, request.suffix, path=request.path, multiline=request.multiline)
        multiline = is_multiline(cursor)
        max_new = request.max_new_tokens or self.config.max_new_tokens
        prompt = self._prompt(request, max_new)
        cursor.prefix_brackets  # computed here, not on the engine thread  # noqa: B018
        t_context = time.perf_counter()

        from mellum.engine import SamplingParams

        deadline_s = None
        if request.deadline_ms is not None:
            deadline_s = request.deadline_ms / 1000.0 - (t_context - t0)
            if deadline_s <= 0:
                return self._result(request, prompt, [], "", "", "deadline", {}, t0, t_context, multiline)
        params = SamplingParams(
            max_new_tokens=max_new, temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
            seed=request.seed, stop_ids=self.stop_ids, deadline_s=deadline_s,
            # Re-typing a healed newline completes no line of the completion: the engine counts one more.
            max_lines=((self.config.max_lines if multiline else 1) + prompt.healed.count("\n"))
            if self._has_newline_ids else None,
            allowed_next=prompt.allowed_next,
        )
        stop_event = _Either(cancel)
        tokens: "queue.Queue[int | None]" = queue.Queue()
        outcome: dict = {}
        watched: list[int] = []
        decided: dict = {"reason": None, "lines": 0}

        def watch(token: int) -> None:
            """Runs on the engine's thread for each token: the stop decisions (healing mismatch, stop strings, the
            filters ending the block) take effect before the next decode step, whatever the consumer is doing."""
            watched.append(token)
            if decided["reason"] is None:
                visible, consistent = _unheal(self.tokenizer.decode(watched), prompt.healed)
                if not consistent:
                    decided["reason"] = "healing_mismatch"
                elif _first_stop(visible, request.stop) is not None:
                    decided["reason"] = "stop_string"
                else:
                    lines = visible.count("\n")
                    if lines != decided["lines"]:  # the filters only decide on complete lines
                        decided["lines"] = lines
                        if self.config.early_stop and self.postprocess.ended(visible, cursor):
                            decided["reason"] = "filter"
                if decided["reason"] is not None:
                    stop_event.set()
            tokens.put(token)

        def run() -> None:
            try:
                outcome["result"] = self.engine.generate(prompt.ids, params, stop_event, watch)
            except BaseException as exc:  # re-raised on the caller's thread
                outcome["error"] = exc
            finally:
                tokens.put(None)

        worker = threading.Thread(target=run, name="mellum-complete", daemon=True)
        worker.start()
        generated: list[int] = []
        yielded = ""
        lines_seen = 0
        try:
            while True:
                token = tokens.get()
                if token is None:
                    break
                generated.append(token)
                if not streaming:
                    continue
                visible, consistent = _unheal(self.tokenizer.decode(generated), prompt.healed)
                if not consistent:
                    continue
                cut = _first_stop(visible, request.stop)
                if cut is not None:
                    visible = visible[:cut]
                lines = visible.count("\n")
                if lines == lines_seen and cut is None:
                    continue
                lines_seen = lines
                # Commit the complete lines the filters keep, all but the last `stream_holdback_lines`.
                done = visible[: visible.rfind("\n") + 1]
                kept = self.postprocess(done, cursor).split("\n") if done.strip() else []
                commit = "\n".join(kept[: max(0, len(kept) - self.config.stream_holdback_lines)])
                if commit.startswith(yielded) and len(commit) > len(yielded):
                    piece, yielded = commit[len(yielded):], commit
                    yield piece
        finally:
            stop_event.set()  # a consumer that stopped early cancels the request
            worker.join()
        if "error" in outcome:
            raise outcome["error"]
        result = outcome["result"]
        raw = self.tokenizer.decode(result.tokens)
        visible, consistent = _unheal(raw, prompt.healed)
        cut = _first_stop(visible, request.stop)
        if cut is not None:
            visible = visible[:cut]
        text = self.postprocess(visible, cursor) if consistent else ""
        if cut is not None:
            text = _keep_space_before_stop(text, visible)
        if not text.startswith(yielded):
            text = yielded  # the filters changed their mind about committed lines: keep what the user saw
        if len(text) > len(yielded):
            yield text[len(yielded):]
        reason = "stop_string" if cut is not None else (decided["reason"] or result.stop_reason)
        return self._result(request, prompt, result.tokens, raw, text, reason, result, t0, t_context, multiline)

    # ---- context -----------------------------------------------------------------------------------------
    def packer(self, project_root: str | None, create: bool = True):
        """The context packer of a project (its `ProjectIndex` built on first use, then kept), and its lock; for
        `None`, a packer without an index (client-sent context only). Servers update buffers through
        `packer.index.update(path, text)` under the lock. None when `mellum.context` cannot be imported, or when
        `create` is False and the project has no packer yet."""
        key = None if project_root is None else str(Path(project_root).resolve())
        with self._packers_lock:
            if key in self._packers:
                return self._packers[key]
        if not create:
            return None, threading.Lock()
        try:
            from mellum.context import ContextConfig, ContextPacker, ProjectIndex
        except ImportError:  # the context module is optional for the service: fall back to client context
            return None, threading.Lock()
        base = self.context_config or ContextConfig()
        config = dataclasses.replace(base, prompt_format=self.format.name, window_tokens=self.window)
        index = ProjectIndex(key, config) if key is not None else None  # built outside the lock: can take seconds
        # Counted as `_encode` encodes: special-token strings inside code are text, not control tokens.
        packer = ContextPacker.for_tokenizer(index, self.tokenizer, config)
        with self._packers_lock:
            return self._packers.setdefault(key, (packer, threading.Lock()))

    def _context(self, request: CompletionRequest, budget: int) -> tuple[str, str, str, list[ContextFile], bool]:
        """(path as the model sees it, prefix, suffix, context files least relevant first, whether cut)."""
        packer, lock = self.packer(request.project_root)
        buffers = [ContextFile(path, text) for path, text in request.open_files.items() if path != request.path and text]
        extra = [f for f in request.extra_context if f.text]
        if packer is None:
            return request.path, request.prefix, request.suffix, buffers + extra[::-1], False
        if packer.index is None:
            extra = extra + buffers  # no index to sync buffers into: they become pinned context after the client's
        with lock:
            path = packer.index.relative(request.path) or request.path if packer.index is not None else request.path
            packed = packer.pack(request.path, request.prefix, request.suffix, budget,
                                 open_files=request.open_files or None, extra=extra)
            # Truncated: text the window could not hold, not the packer's trimming to make room for project context.
            cut = (packed.prefix != request.prefix or packed.suffix != request.suffix) and not packer.file_fits(
                request.path, request.prefix, request.suffix, budget)
        cut |= bool(extra) and not {(f.path, f.text) for f in extra} <= {(p.path, p.text) for p in packed.pieces}
        return path, packed.prefix, packed.suffix, packed.context, cut

    # ---- prompt -------------------------------------------------------------------------------------------
    def reference_nll(self, request: CompletionRequest, reference: str) -> tuple[float, int]:
        """(mean negative log-likelihood in nats/token, tokens) of `reference` written as the completion of
        `request`, after exactly the prompt the request would get (context, budget, trimming; no token healing).
        The reference is tokenized on its own and cut to `max_new_tokens`. Lower is better: for comparing context
        settings on the same holes, where a weak model's exact matches are too rare to tell them apart."""
        score = getattr(self.engine, "score", None)
        if score is None:
            raise ValueError(f"{type(self.engine).__name__} cannot score text (log-likelihoods need the native engine)")
        max_new = request.max_new_tokens or self.config.max_new_tokens
        target = self.tokenizer.encode(reference)[:max_new]
        if not target:
            raise ValueError("reference_nll: the reference text is empty")
        logprobs = score(self._fitted_prompt(request, max_new).ids, target)
        return -sum(logprobs) / len(logprobs), len(logprobs)

    def _prompt(self, request: CompletionRequest, max_new: int) -> Prompt:
        prompt = self._fitted_prompt(request, max_new)
        if self.config.token_healing:
            self._heal(prompt)
        return prompt

    def _fitted_prompt(self, request: CompletionRequest, max_new: int) -> Prompt:
        budget = self.window - max_new
        if budget < 8:
            raise ValueError(f"max_new_tokens={max_new} leaves no room for a prompt in the model's "
                             f"{self.window}-token window")
        path, prefix, suffix, context, cut = self._context(request, budget)
        prompt = self._encode(path, prefix, suffix, context, truncated=cut)
        # Over budget: drop context files, least relevant first, then cut the file's text far from the cursor.
        while len(prompt.ids) > budget and context:
            context = context[1:]
            prompt = self._encode(path, prefix, suffix, context, truncated=True)
        for _ in range(4):  # re-tokenising cut text can shift a token or two
            excess = len(prompt.ids) - budget
            if excess <= 0:
                break
            prefix, suffix = self._trim_file(prompt, excess)
            prompt = self._encode(path, prefix, suffix, context, truncated=True)
        if len(prompt.ids) > budget:
            raise ValueError(f"the prompt does not fit the model's {self.window}-token window even without context")
        return prompt

    def _encode(self, path: str, prefix: str, suffix: str, context: list[ContextFile], truncated: bool) -> Prompt:
        # Control tokens come only from the format's templates: code holding `<fim_prefix>` stays text.
        before, after = self.format.around_prefix(path, suffix, context)
        tok = self.tokenizer
        return Prompt(tok.encode_segments(before), tok.encode(prefix), tok.encode_segments(after),
                      prefix, suffix, list(context), truncated)

    def _trim_file(self, prompt: Prompt, excess: int) -> tuple[str, str]:
        """Prefix cut from the left and suffix from the right so the prompt loses `excess` tokens; the suffix keeps
        at most `suffix_share` of what the file may use, the prefix the rest (the text at the cursor stays)."""
        tok = self.tokenizer
        suffix_ids = tok.encode(prompt.suffix_text) if prompt.suffix_text else []
        fixed = len(prompt.ids) - len(prompt.prefix) - len(suffix_ids)  # markers, path, suffix-free parts
        room = max(0, len(prompt.ids) - excess - fixed)  # tokens prefix + suffix may use together
        keep_suffix = min(len(suffix_ids), max(int(room * self.config.suffix_share), room - len(prompt.prefix)))
        keep_prefix = max(0, room - keep_suffix)
        prefix = _tail_text(tok, prompt.prefix, keep_prefix)
        suffix = _head_text(tok, suffix_ids, keep_suffix)
        return prefix, suffix

    def _heal(self, prompt: Prompt) -> None:
        """Back off the prefix's last token(s) when a longer token could cover them (`self.get_us` → `self.get`
        + output that starts with `_us`), constraining the generated tokens until they re-type it (issue #4 item 6).

        Newlines included: a cursor at the start of an empty line leaves the prefix ending in a lone "\n" token,
        which training text almost never has (BPE merges the newline with the next line's indentation, e.g.
        "\n       " + " return"), so unhealed the model indents by the wrong amount after it."""
        n = min(self.config.heal_tokens, len(prompt.prefix))
        special = self.tokenizer.special_ids
        while n > 0:
            removed_ids = prompt.prefix[-n:]
            removed = self.tokenizer.decode(removed_ids)
            if any(i in special for i in removed_ids) or "\ufffd" in removed or not removed:
                n -= 1
                continue
            table = healing_table(self.tokenizer)
            extending = table.extending(removed)
            if len(extending) < 2:  # only the token itself: nothing to heal
                n -= 1
                continue
            cap = self.config.max_healing_ids
            constraint = HealingConstraint(table, self.tokenizer.token_strings, removed, cap)
            if constraint(()) is None:  # more first tokens than the backend takes
                n -= 1
                continue
            prompt.prefix = prompt.prefix[:-n]
            prompt.healed = removed
            prompt.allowed_next = constraint
            return

    # ---- result -------------------------------------------------------------------------------------------
    def _result(self, request, prompt: Prompt, tokens, raw, text, stop_reason, result, t0, t_context, multiline):
        engine_ms = getattr(result, "timings_ms", None) or {}
        total = (time.perf_counter() - t0) * 1000.0
        timings = {
            "context": (t_context - t0) * 1000.0,
            "queue": float(engine_ms.get("queue", 0.0)),
            "prefill": float(engine_ms.get("prefill", 0.0)),
            "decode": float(engine_ms.get("decode", 0.0)),
            "total": total,
        }
        return Completion(
            id=uuid.uuid4().hex,
            text=text,
            prompt=self._prompt_text(prompt) if request.return_prompt else None,
            prompt_tokens=len(prompt.ids),
            cached_tokens=int(getattr(result, "cached_tokens", 0) or 0),
            generated_tokens=len(tokens),
            stop_reason=stop_reason,
            timings_ms=timings,
            truncated=prompt.truncated,
            multiline=multiline,
            raw_text=raw,
            healed=prompt.healed,
            context_paths=[f.path for f in prompt.context],
            tokens=list(tokens),
        )

    def _prompt_text(self, prompt: Prompt) -> str:
        """The exact text the model saw (after healing, before generation)."""
        return self.tokenizer.decode(prompt.ids)


def _unheal(raw: str, healed: str) -> tuple[str, bool]:
    """The completion after the healed text: ('', True) while the output is still re-typing it, ('', False) once
    it diverged from it."""
    if not healed:
        return raw, True
    if raw.startswith(healed):
        return raw[len(healed):], True
    return "", healed.startswith(raw)


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _keep_space_before_stop(text: str, visible: str) -> str:
    """The filtered text with the spaces or tabs that stood right before a client's stop string put back.

    OpenAI-compatible servers return the text before a stop string as it is: with `stop=["+ b"]`, `a + b` gives
    `a `, which the client joins to what it stopped at (`a` + `+ b` would read `a+ b`). The whitespace filter must
    not take that space; it still drops blank lines before the stop, and cuts the filters made elsewhere (block
    end, the line's rest, a bracket) stand: the space is restored only when the text still ends where it did.
    """
    stripped = visible.rstrip(" \t")
    space, last = visible[len(stripped):], stripped.rsplit("\n", 1)[-1]
    if not space or not last.strip() or text.count("\n") != stripped.count("\n"):
        return text
    # The last line may be re-indented by the filters, never otherwise changed when they kept it whole.
    return text + space if text.rsplit("\n", 1)[-1].lstrip() == last.lstrip() else text


def _tail_text(tokenizer, ids: list[int], keep: int) -> str:
    """The text of the last `keep` tokens, starting at a line boundary when one is near (whole lines read better)."""
    if keep <= 0:
        return ""
    text = tokenizer.decode(ids[-keep:]).lstrip("\ufffd")
    newline = text.find("\n")
    return text[newline + 1 :] if 0 <= newline < len(text) // 4 else text


def _head_text(tokenizer, ids: list[int], keep: int) -> str:
    """The text of the first `keep` tokens, ending at a line boundary when one is near."""
    if keep <= 0:
        return ""
    text = tokenizer.decode(ids[:keep]).rstrip("\ufffd")
    newline = text.rfind("\n")
    return text[: newline + 1] if newline >= 0 and newline > len(text) * 3 // 4 else text
