"""Prompt formats as data: one definition lays out both training samples and serving prompts.

What the model was trained on is exactly what it is served (ARCHITECTURE.md). A format is a handful of
templates with named fields; nothing here is chosen by matching a model's name — the model's config names
its format (`prompt_format`), looked up in `FORMATS`.

Mellum (REFERENCE.md §1, model card): suffix-prefix-middle order, one `<filename>` block per context
file, nearest file last, then the current file's name and the FIM section:

    <filename>utils.py\\n<utils.py><filename>example.py\\n<fim_suffix><suffix><fim_prefix><prefix><fim_middle>
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

_FIELD = re.compile(r"\{(path|text|repo|prefix|suffix)\}")


def _render(template: str, **values: str) -> str:
    """Substitute `{name}` fields in one pass, so braces or field names inside code are left alone."""
    return _FIELD.sub(lambda m: values[m.group(1)], template)


def _segments(template: str, **values: str) -> list[tuple[str, str]]:
    parts = _FIELD.split(template)  # literal, field name, literal, field name, ...
    return [("text", values[p]) if i % 2 else ("literal", p) for i, p in enumerate(parts)]


@dataclass(frozen=True)
class ContextFile:
    """A piece of project context: a file (or a chunk of one) shown to the model before the current file."""

    path: str
    text: str


@dataclass(frozen=True)
class PromptFormat:
    """Templates of one model family's FIM prompt.

    `fim` holds `{prefix}` and `{suffix}` and ends where the model starts generating the middle.
    `context_file` renders one context file; `current_file` the header of the file being completed;
    `repo` (optional) the repository name at the very start. `eos` ends a training middle; generation stops
    at any of `stop`.
    """

    name: str
    fim: str
    context_file: str
    current_file: str
    repo: str = ""
    eos: str = "<|endoftext|>"
    stop: tuple[str, ...] = ()
    fim_tokens: tuple[str, ...] = ()  # the FIM control tokens this format uses (for data checks)
    supports_suffix: bool = True

    @property
    def order(self) -> str:
        """'spm' when the suffix comes before the prefix, 'psm' otherwise, 'plain' with no suffix."""
        if not self.supports_suffix:
            return "plain"
        return "spm" if self.fim.index("{suffix}") < self.fim.index("{prefix}") else "psm"

    def render_context(self, files: Iterable[ContextFile]) -> str:
        return "".join(_render(self.context_file, path=f.path, text=f.text) for f in files)

    def context_segments(self, files: Iterable[ContextFile]) -> list[tuple[str, str]]:
        """`render_context` as the ("literal", ...) / ("text", ...) pieces of `segments`."""
        return [piece for f in files for piece in _segments(self.context_file, path=f.path, text=f.text) if piece[1]]

    def render(
        self,
        path: str,
        prefix: str,
        suffix: str = "",
        context: Sequence[ContextFile] = (),
        repo: str | None = None,
    ) -> str:
        """The full prompt: repo header, context files in the given order (most relevant last), the FIM section."""
        return "".join(piece for _, piece in self.segments(path, prefix, suffix, context, repo))

    def segments(
        self,
        path: str,
        prefix: str,
        suffix: str = "",
        context: Sequence[ContextFile] = (),
        repo: str | None = None,
    ) -> list[tuple[str, str]]:
        """The prompt of `render` as ("literal", template text) and ("text", caller text) pieces, in order.

        Only literals may hold control tokens: code that happens to contain `<fim_prefix>` must be encoded as text
        (see `Tokenizer.encode_segments`). Joined, the pieces are `render(...)`.
        """
        out: list[tuple[str, str]] = []
        if self.repo and repo:
            out += _segments(self.repo, repo=repo)
        out += self.context_segments(context)
        out += _segments(self.current_file, path=path)
        out += _segments(self.fim, prefix=prefix, suffix=suffix if self.supports_suffix else "")
        return [piece for piece in out if piece[1]]

    def around_prefix(
        self, path: str, suffix: str = "", context: Sequence[ContextFile] = ()
    ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """The `segments` of a prompt before and after its prefix. A completion prompt encodes the prefix on its
        own, so that its last tokens end at the cursor (token healing backs them off) whatever text precedes it;
        counting the prompt (context budgets) follows the same cut."""
        segments = self.segments(path, _PREFIX_MARK, suffix, context)
        cut = segments.index(("text", _PREFIX_MARK))
        return segments[:cut], segments[cut + 1:]

    def training_text(
        self,
        path: str,
        prefix: str,
        middle: str,
        suffix: str,
        context: Sequence[ContextFile] = (),
        repo: str | None = None,
    ) -> tuple[str, str]:
        """(prompt, target) of a FIM training sample: the target is the middle followed by `eos`."""
        return self.render(path, prefix, suffix, context, repo), middle + self.eos


_PREFIX_MARK = "\x00\ue000prefix\ue000\x00"  # stands for the prefix in `around_prefix`: text no code holds

_MELLUM_STOP = ("<|endoftext|>", "<filename>", "<reponame>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<fim_pad>")

FORMATS: dict[str, PromptFormat] = {
    # Mellum model card layout (REFERENCE.md §1): newline after the current file's name.
    "mellum": PromptFormat(
        name="mellum",
        fim="<fim_suffix>{suffix}<fim_prefix>{prefix}<fim_middle>",
        context_file="<filename>{path}\n{text}",
        current_file="<filename>{path}\n",
        repo="<reponame>{repo}\n",
        stop=_MELLUM_STOP,
        fim_tokens=("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ),
    # JetBrains' SDK omits the newline after the current file's name (REFERENCE.md §1).
    "mellum-sdk": PromptFormat(
        name="mellum-sdk",
        fim="<fim_suffix>{suffix}<fim_prefix>{prefix}<fim_middle>",
        context_file="<filename>{path}\n{text}",
        current_file="<filename>{path}",
        repo="<reponame>{repo}\n",
        stop=_MELLUM_STOP,
        fim_tokens=("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ),
    # Same tokens in prefix-suffix-middle order (used for PSM training samples).
    "mellum-psm": PromptFormat(
        name="mellum-psm",
        fim="<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>",
        context_file="<filename>{path}\n{text}",
        current_file="<filename>{path}\n",
        repo="<reponame>{repo}\n",
        stop=_MELLUM_STOP,
        fim_tokens=("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ),
    # Qwen2.5-Coder repository-level FIM (PSM with repo and file separators).
    "qwen2.5-coder": PromptFormat(
        name="qwen2.5-coder",
        fim="<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>",
        context_file="<|file_sep|>{path}\n{text}\n",
        current_file="<|file_sep|>{path}\n",
        repo="<|repo_name|>{repo}\n",
        eos="<|endoftext|>",
        stop=("<|endoftext|>", "<|file_sep|>", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|repo_name|>"),
        fim_tokens=("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ),
    # StarCoder2: the current file's path sits inside the FIM prefix section.
    "starcoder2": PromptFormat(
        name="starcoder2",
        fim="<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>",
        context_file="<file_sep>{path}\n{text}",
        current_file="<file_sep>",
        repo="<repo_name>{repo}",
        stop=("<|endoftext|>", "<file_sep>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>", "<repo_name>"),
        fim_tokens=("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    ),
    # Plain left-to-right: context files as comments-free blocks, then the prefix; the suffix is not shown.
    "plain": PromptFormat(
        name="plain",
        fim="{prefix}",
        context_file="# file: {path}\n{text}\n",
        current_file="# file: {path}\n",
        stop=("<|endoftext|>",),
        supports_suffix=False,
    ),
}


def get_format(name: str) -> PromptFormat:
    """Look a format up by exact name; the error lists the known ones."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown prompt format {name!r}; known: {', '.join(sorted(FORMATS))}") from None
