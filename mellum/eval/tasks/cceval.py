"""CrossCodeEval (Ding et al. 2023) subset: next-line completion with cross-file context, scored by match.

Three settings (the `split`): `provided` — the benchmark's ranked BM25 chunks, best nearest the cursor;
`none` — the file alone; `packed` — the same chunks through our packer (`mellum.context.pack_chunks`:
deduplication, cursor-window filtering, a token budget). Metrics follow the paper: exact match and edit
similarity of the first line(s), identifier exact match and F1. Only 100 Python tasks: report with intervals.
"""

from __future__ import annotations

from mellum.eval.tasks import Benchmark, Problem, Score, match_score, literal, read_jsonl
from mellum.prompt import ContextFile

FILES = {
    "python": "tabby_sample_python_bm25cfc_100.jsonl.gz",
    "csharp": "tabby_head10_csharp_line_completion_rg1_bm25.jsonl.gz",
}


class CrossCodeEval(Benchmark):
    name = "cceval"
    splits = ("provided", "none", "packed")
    scoring = "match"
    max_new_tokens = 48
    multiline = False
    context_tokens = 512  # CrossCodeEval's cross-file budget (cfc_seq_length)
    result_settings = ("context_tokens",)

    def __init__(self, data_dir, split=None, language: str = "python", count_tokens=None, count_segments=None,
                 prompt_format: str = "mellum"):
        super().__init__(data_dir, split)
        if language not in FILES:
            raise ValueError(f"cceval: unknown language {language!r}; choose one of {', '.join(FILES)}")
        self.language = language
        # How the packer counts a context block: as the completer's prompt encodes it when it has a tokenizer
        # (`Completer.count_tokens` / `count_segments`: code is plain text, only the format's literals are control
        # tokens), else about four characters a token.
        self.count_tokens = count_tokens or (lambda text: (len(text) + 3) // 4)
        self.count_segments = count_segments
        self.prompt_format = prompt_format

    @property
    def title(self) -> str:
        return f"cceval/{self.language}/{self.split}"

    def load(self) -> list[Problem]:
        problems = []
        for row in read_jsonl(self.data_dir / "crosscodeeval-subset" / FILES[self.language]):
            meta = literal(row["metadata"])
            chunks = literal(row["crossfile_context"]).get("list", [])
            problems.append(
                Problem(
                    task_id=meta["task_id"],
                    prefix=row["prompt"],
                    suffix=row["right_context"],
                    reference=row["groundtruth"],
                    path=meta["file"],
                    language=self.language,
                    context=self._context(chunks, row["prompt"]),
                    meta={"repository": meta["repository"]},
                )
            )
        return problems

    def _context(self, chunks: list[dict], prefix: str) -> list[ContextFile]:
        if self.split == "none":
            return []
        if self.split == "provided":
            # Given best first; our prompt format wants the most relevant last.
            return [ContextFile(c["filename"], c["retrieved_chunk"]) for c in reversed(chunks)]
        from mellum.context import pack_chunks

        window = "\n".join(prefix.splitlines()[-10:])
        pieces = pack_chunks(chunks, self.count_tokens, self.context_tokens, cursor_window=window,
                             prompt_format=self.prompt_format, count_segments=self.count_segments)
        return [ContextFile(p.path, p.text) for p in pieces]

    def postprocess(self, problem: Problem, completion: str) -> str:
        lines = max(1, problem.reference.count("\n") + 1)
        return "\n".join(completion.split("\n")[:lines])

    def score(self, problem: Problem, completion: str, sandbox=None) -> Score:
        return match_score(completion, problem.reference)
