"""Completers: what fills a benchmark's hole — the native model, an OpenAI-compatible server, or harness checks.

The checks make the harness trustworthy before any model is measured: `oracle` answers with the benchmark's own
reference (must score 100%), `empty` with nothing (~0%), `wrong` with another task's reference (must fail).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from typing import Sequence

from mellum.eval.tasks import Benchmark, Problem


@dataclass(frozen=True)
class Sampling:
    """How completions are drawn: greedy for n=1, sampled (temperature, top_p) for pass@k with n > 1."""

    temperature: float = 0.0
    top_p: float = 0.95
    seed: int = 0

    def seed_for(self, task_id: str, sample: int) -> int:
        """A deterministic seed per (run seed, task, sample): reruns and resumed runs draw the same samples."""
        return zlib.crc32(f"{self.seed}:{task_id}:{sample}".encode()) & 0x7FFFFFFF


class Completer:
    """Produces the raw completion of one sample; `postprocess` False means use the text exactly as given."""

    name = "completer"
    postprocess = True
    prompt_format: str | None = None  # the `PromptFormat` its prompts are laid out in, when it lays them out

    def prepare(self, problems: list[Problem]) -> None:
        """Called once with the problems of the run (in order) before any `complete`."""

    def complete(self, problem: Problem, bench: Benchmark, sample: int, sampling: Sampling) -> str:
        raise NotImplementedError

    def count_tokens(self, text: str) -> int | None:
        """Tokens of caller text (code, a prefix) as this completer's prompt encodes it, when known: special-token
        strings in it are plain text. Context packing budgets count with it and `count_segments`."""
        return None

    def count_segments(self, segments: Sequence[tuple[str, str]]) -> int | None:
        """Tokens of rendered prompt parts (`PromptFormat.segments`) as this completer's prompt encodes them, when
        known: control tokens only where the format's literals put them, code in "text" parts as plain text."""
        return None

    def reference_nll(self, problem: Problem, bench: Benchmark) -> tuple[float, int] | None:
        """(mean negative log-likelihood in nats/token, tokens) of the reference after this completer's prompt, or
        None when it cannot score text (servers, harness checks)."""
        return None

    def describe(self) -> dict:
        return {"completer": self.name}

    def close(self) -> None:
        pass


class OracleCompleter(Completer):
    """The canonical solution: a correct harness scores it 100%."""

    name = "oracle"
    postprocess = False

    def complete(self, problem, bench, sample, sampling) -> str:
        return problem.reference


class EmptyCompleter(Completer):
    """Nothing at all: should score about 0% (a few holes are optional code, e.g. a blank line)."""

    name = "empty"
    postprocess = False

    def complete(self, problem, bench, sample, sampling) -> str:
        return ""


class WrongCompleter(Completer):
    """The reference of a different task: plausible code in the wrong place. Taken from the next task about
    another program where there is one (holes in the same function can overlap and still fit)."""

    name = "wrong"
    postprocess = False

    def prepare(self, problems: list[Problem]) -> None:
        self._next: dict[str, str] = {}
        for i, problem in enumerate(problems):
            others = [problems[(i + step) % len(problems)] for step in range(1, len(problems))]
            differ = [o for o in others if o.reference.strip() != problem.reference.strip()]
            elsewhere = [o for o in differ if o.prefix[:200] != problem.prefix[:200]]
            if elsewhere or differ:
                self._next[problem.task_id] = (elsewhere or differ)[0].reference

    def complete(self, problem, bench, sample, sampling) -> str:
        return self._next.get(problem.task_id, "")


class NativeCompleter(Completer):
    """The in-process model through `mellum.complete.CompletionService` (context, prompt format, filters)."""

    name = "native"

    def __init__(self, model_dir, device: str = "cpu", quantize: str | None = None, compile: bool = False):
        from mellum.complete import CompletionService

        self.model_dir = str(model_dir)
        self.quantize = quantize
        self.service = CompletionService.from_pretrained(model_dir, device=device, quantize=quantize, compile=compile)

    def complete(self, problem, bench, sample, sampling) -> str:
        return self.service.complete(self._request(problem, bench, sample, sampling)).text

    def reference_nll(self, problem, bench) -> tuple[float, int] | None:
        if not problem.reference:
            return None
        return self.service.reference_nll(self._request(problem, bench, 0, Sampling()), problem.reference)

    @staticmethod
    def _request(problem, bench, sample: int, sampling: Sampling):
        from mellum.complete import CompletionRequest

        return CompletionRequest(
            path=problem.path,
            prefix=problem.prefix,
            suffix=problem.suffix,
            extra_context=list(problem.context),
            max_new_tokens=bench.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
            seed=sampling.seed_for(problem.task_id, sample),
            multiline=bench.multiline,
            stop=list(bench.stop),
        )

    @property
    def prompt_format(self) -> str:
        return self.service.format.name

    # Counted as `CompletionService._encode` encodes a prompt (`Tokenizer.encode_segments`): a `<|endoftext|>` typed
    # in code is the tokens of its characters, as for `ContextPacker.for_tokenizer` in the service itself.
    def count_tokens(self, text: str) -> int:
        return self.service.tokenizer.count(text)

    def count_segments(self, segments: Sequence[tuple[str, str]]) -> int:
        return len(self.service.tokenizer.encode_segments(segments))

    def describe(self) -> dict:
        return {"completer": self.name, "model": self.model_dir, "quantize": self.quantize}

    def close(self) -> None:
        self.service.close()


class OpenAICompleter(Completer):
    """Any OpenAI-compatible server's `/v1/completions`.

    By default the request carries `prompt` = prefix and `suffix` (servers that do FIM themselves, e.g. `mellum
    serve`, vLLM for FIM models, llama.cpp); context files are not sent. With `prompt_format`, the prompt is
    rendered here in that format (context included) and sent raw, for servers that only continue text.
    """

    name = "openai"

    def __init__(self, url: str, model: str = "", prompt_format: str | None = None, timeout_s: float = 120.0,
                 api_key: str | None = None):
        from mellum.prompt import get_format

        from mellum.engine.openai import completions_url

        self.url = completions_url(url)
        self.model = model
        self.format = get_format(prompt_format) if prompt_format else None
        self.prompt_format = self.format.name if self.format else None
        self.timeout_s = timeout_s
        self.api_key = api_key

    def complete(self, problem, bench, sample, sampling) -> str:
        body = {
            "model": self.model,
            "max_tokens": bench.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p if sampling.temperature > 0 else 1.0,
            "seed": sampling.seed_for(problem.task_id, sample),
        }
        stop = list(bench.stop)
        if self.format is None:
            body.update(prompt=problem.prefix, suffix=problem.suffix)
        else:
            body["prompt"] = self.format.render(problem.path, problem.prefix, problem.suffix, problem.context)
            stop += list(self.format.stop)
        if stop:
            body["stop"] = stop[:4] if self.format is None else stop  # OpenAI's own API allows at most 4
        return post_json(self.url, body, self.timeout_s, self.api_key)["choices"][0]["text"]

    def describe(self) -> dict:
        return {"completer": self.name, "url": self.url, "model": self.model,
                "prompt_format": self.format.name if self.format else None}


def post_json(url: str, body: dict, timeout_s: float, api_key: str | None = None) -> dict:
    """POST a JSON body and decode the JSON answer; HTTP errors become ValueError with the server's message."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300]
        raise ValueError(f"{url} answered HTTP {exc.code}: {detail}") from None
    except urllib.error.URLError as exc:
        raise ValueError(f"cannot reach {url}: {exc.reason} (is the server running?)") from None


CHECKS = {"oracle": OracleCompleter, "empty": EmptyCompleter, "wrong": WrongCompleter}


def make_completer(check: str | None = None, model=None, url: str | None = None, **options) -> Completer:
    """The completer a command line asks for: a harness check, a server URL, or a model directory (default:
    the bundled reference model)."""
    if check:
        if check not in CHECKS:
            raise ValueError(f"unknown check {check!r}; choose one of {', '.join(CHECKS)}")
        return CHECKS[check]()
    if url:
        return OpenAICompleter(url, model=options.get("served_model", ""), prompt_format=options.get("prompt_format"))
    if model is None:
        from mellum.assets import default_model_dir

        model = default_model_dir()
    return NativeCompleter(model, device=options.get("device", "cpu"), quantize=options.get("quantize"))
