"""The completion service end to end: a tiny random model saved to disk (real tensors, gibberish text) for the
real path, and a hand-written stub model whose logits spell a chosen script for exact behaviour."""

from __future__ import annotations

import json
import threading
import uuid

import pytest
import torch
from torch import nn

from mellum.complete import (CompletionRequest, CompletionService, HealingConstraint, ServiceConfig, healing_table,
                             newline_ids)
from mellum.config import get_config
from mellum.engine import NativeEngine
from mellum.model import ModelOutput
from mellum.postprocess import Cursor, pipeline
from mellum.prompt import ContextFile, get_format

CODE = (
    "import json\n\n\nclass Store:\n    def __init__(self, path):\n        self.path = path\n\n"
    "    def load(self):\n        with open(self.path) as f:\n            return json.load(f)\n"
)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def service(model_dir):
    svc = CompletionService.from_pretrained(model_dir, max_batch=4)
    yield svc
    svc.close()


def visible(completion) -> str:
    return completion.raw_text[len(completion.healed):]


# ---- the real path: tiny random model ------------------------------------------------------------------------
def test_ids_timings_and_counts(service):
    req = CompletionRequest("store.py", CODE, "\n", max_new_tokens=12)
    a, b = service.complete(req), service.complete(req)
    assert uuid.UUID(a.id) and a.id != b.id
    for key in ("context", "prefill", "decode", "total"):
        assert a.timings_ms[key] >= 0.0
    assert a.timings_ms["total"] >= a.timings_ms["prefill"]
    assert 1 <= a.generated_tokens <= 12 and a.generated_tokens == len(a.tokens)
    assert a.prompt_tokens > 0 and a.prompt is None
    assert a.raw_text == b.raw_text  # greedy: the same answer (the second from the prefix cache)
    assert b.cached_tokens > 0


def test_return_prompt_is_the_exact_prompt(service, tiny_tokenizer):
    prefix = CODE + "\n"
    req = CompletionRequest("store.py", prefix, "x = 1\n", return_prompt=True, max_new_tokens=4,
                            extra_context=[ContextFile("util.py", "def helper():\n    pass\n")])
    c = service.complete(req)
    assert prefix.endswith(c.healed)  # the prompt ends before the text token healing backed off
    fmt = get_format("mellum")
    kept = prefix[: len(prefix) - len(c.healed)]
    assert c.prompt == fmt.render("store.py", kept, "x = 1\n", [ContextFile("util.py", "def helper():\n    pass\n")])
    assert c.prompt_tokens == len(tiny_tokenizer.encode(c.prompt, allow_special=True))
    assert c.context_paths == ["util.py"]


def test_postprocessing_is_applied(service):
    cases = [("x = json.lo", "\n", None), ("def f(a):", "\n", None), ("value = compute(", ")\n", None),
             ("", "", True)]
    for prefix, suffix, multiline in cases:
        req = CompletionRequest("a.py", CODE + prefix, suffix, max_new_tokens=24, multiline=multiline)
        c = service.complete(req)
        cursor = Cursor(CODE + prefix, suffix, path="a.py", multiline=multiline)
        assert c.text == pipeline()(visible(c), cursor)
        if not c.multiline:
            assert "\n" not in c.text


def test_token_healing_constrains_the_first_token(service, tiny_tokenizer):
    table = healing_table(tiny_tokenizer)
    strings = tiny_tokenizer.token_strings
    for temperature, seed in [(0.0, None), (1.0, 1), (1.0, 2), (1.0, 3)]:
        req = CompletionRequest("a.py", CODE + "        self.pa", "\n", max_new_tokens=6, temperature=temperature,
                                seed=seed, return_prompt=True)
        c = service.complete(req)
        assert c.healed, "the prefix ends inside a longer token"
        assert len(table.extending(c.healed)) >= 2
        first = strings[c.tokens[0]]
        assert first.startswith(c.healed) or c.healed.startswith(first)
        assert c.prompt.endswith(("self.pa"[: -len(c.healed)] if len(c.healed) < 7 else "") + "<fim_middle>")
        if c.raw_text.startswith(c.healed):
            assert c.stop_reason != "healing_mismatch"
        else:
            assert c.text == "" and c.stop_reason == "healing_mismatch"


def test_healing_table_queries(tiny_tokenizer):
    table = healing_table(tiny_tokenizer)
    assert healing_table(tiny_tokenizer) is table  # cached per tokenizer
    strings = tiny_tokenizer.token_strings
    for i in table.extending("se"):
        assert strings[i].startswith("se")
    assert set(table.extending("se")) == {i for i, s in enumerate(strings)
                                           if s.startswith("se") and i not in tiny_tokenizer.special_ids}
    assert all("self"[: len(strings[i])] == strings[i] and len(strings[i]) < 4 for i in table.prefixes("self"))
    assert newline_ids(tiny_tokenizer) and all("\n" in strings[i] for i in newline_ids(tiny_tokenizer))


def test_overlong_prompt_is_truncated_far_from_the_cursor(service, tiny_tokenizer):
    body = "".join(f"def function_{i}(a, b):\n    return a * {i} + b\n\n" for i in range(200))
    prefix = body + "def area(radius):\n    return 3.14 * rad"
    suffix = "\n\n" + body
    big = [ContextFile(f"ctx{i}.py", body[:2000]) for i in range(3)]
    req = CompletionRequest("geo.py", prefix, suffix, extra_context=big, max_new_tokens=16, return_prompt=True)
    c = service.complete(req)
    assert c.truncated
    assert c.prompt_tokens <= service.window - 16
    assert c.context_paths == []  # context goes first
    kept_prefix = c.prompt.split("<fim_prefix>")[1].split("<fim_middle>")[0]
    assert (kept_prefix + c.healed).endswith("def area(radius):\n    return 3.14 * rad")
    kept_suffix = c.prompt.split("<fim_suffix>")[1].split("<fim_prefix>")[0]
    assert kept_suffix.startswith("\n\ndef function_0(a, b):")
    assert len(kept_prefix) < len(prefix) and len(kept_suffix) < len(suffix)


def test_context_dropped_before_the_file(service):
    small = "def f():\n    return 1\n"
    ctx = [ContextFile(f"c{i}.py", "".join(f"value_{i}_{j} = {j}\n" for j in range(40))) for i in range(6)]
    c = service.complete(CompletionRequest("a.py", small, "", extra_context=ctx, max_new_tokens=8))
    assert c.truncated and 0 < len(c.context_paths) < 6
    # The client's pieces are most relevant first; the prompt puts the most relevant last, nearest the cursor.
    kept = len(c.context_paths)
    assert c.context_paths == [f.path for f in ctx][:kept][::-1]


def test_stream_pieces_join_to_the_text(service):
    req = CompletionRequest("a.py", CODE, "", max_new_tokens=40, multiline=True)
    gen = service.stream(req)
    pieces = []
    with pytest.raises(StopIteration) as done:
        while True:
            pieces.append(next(gen))
    assert "".join(pieces) == done.value.value.text


def test_cancel_and_early_close_free_the_slot(service):
    cancel = threading.Event()
    cancel.set()
    c = service.complete(CompletionRequest("a.py", CODE, "", max_new_tokens=40), cancel=cancel)
    assert c.stop_reason == "cancelled" and c.generated_tokens <= 1
    gen = service.stream(CompletionRequest("a.py", CODE, "", max_new_tokens=200, multiline=True))
    next(gen, None)
    gen.close()
    assert service.engine.busy_slots == 0


def test_concurrent_requests_match_sequential(service):
    reqs = [CompletionRequest("a.py", CODE + tail, "\n", max_new_tokens=10) for tail in ("x = ", "y = js", "def g(", "#")]
    expected = [service.complete(r).raw_text for r in reqs]
    got: dict[int, str] = {}

    def work(i):
        got[i] = service.complete(reqs[i]).raw_text

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [got[i] for i in range(len(reqs))] == expected


def test_reference_nll_scores_the_reference_after_the_unhealed_prompt(service, model_dir, tiny_tokenizer):
    import mellum

    prefix, suffix, reference = CODE + "\n    def save(self, data):\n        with op", "\n", "en(self.path) as f:"
    context = [ContextFile("util.py", "def helper():\n    pass\n")]
    req = CompletionRequest("store.py", prefix, suffix, max_new_tokens=16, extra_context=context)
    nll, tokens = service.reference_nll(req, reference)
    ids = tiny_tokenizer.encode_segments(get_format("mellum").segments("store.py", prefix, suffix, context))
    target = tiny_tokenizer.encode(reference)
    with torch.no_grad():
        logits = mellum.load_pretrained(model_dir)(torch.tensor([ids + target])).logits[0]
    logprobs = torch.log_softmax(logits[len(ids) - 1:-1], -1).gather(1, torch.tensor(target)[:, None])
    assert tokens == len(target) and nll == pytest.approx(-logprobs.mean().item(), abs=1e-4)
    short, n = service.reference_nll(CompletionRequest("store.py", prefix, suffix, max_new_tokens=2), reference)
    assert n == 2  # cut to what the request may generate
    with pytest.raises(ValueError, match="empty"):
        service.reference_nll(req, "")


def test_bad_requests(service):
    with pytest.raises(ValueError, match="path"):
        CompletionRequest("", "x", "")
    with pytest.raises(ValueError, match="max_new_tokens"):
        CompletionRequest("a.py", "x", "", max_new_tokens=0)
    with pytest.raises(ValueError, match="window"):
        service.complete(CompletionRequest("a.py", "x", "", max_new_tokens=service.window))
    with pytest.raises(ValueError, match="temperature"):
        service.complete(CompletionRequest("a.py", "x", "", temperature=-1.0))
    with pytest.raises(ValueError, match="top_p"):
        service.complete(CompletionRequest("a.py", "x", "", top_p=0.0))
    c = service.complete(CompletionRequest("a.py", CODE, "", deadline_ms=1e-6))
    assert c.stop_reason == "deadline" and c.text == ""


# ---- exact behaviour: a stub model that writes a chosen script -----------------------------------------------
class ScriptModel(nn.Module):
    """Hand-written logits: after a prompt of n tokens, position n-1+k predicts `script[k]` (cache ignored).

    Prefix caching is off in these engines, so each request's first forward starts at position 0 and tells
    the stub where its prompt ends."""

    def __init__(self, config, script: list[int]):
        super().__init__()
        self.config, self.script = config, script
        self.anchor = nn.Parameter(torch.zeros(1))
        self.prompt_end = 0

    def forward(self, input_ids, positions=None, cache=None, doc_ids=None):
        b, t = input_ids.shape
        if positions is None:
            positions = torch.arange(t)[None]
        if int(positions[0, 0]) == 0:
            self.prompt_end = t - 1
        logits = torch.full((b, t, self.config.vocab_size), -1e4)
        for j, p in enumerate(positions[0].tolist()):
            k = p - self.prompt_end
            if 0 <= k < len(self.script):
                logits[:, j, self.script[k]] = 1e4
        return ModelOutput(logits, torch.zeros(b, t, 4), [])


def scripted(tokenizer, text: str, config: ServiceConfig | None = None, first_ids: list[int] | None = None):
    script = (first_ids or []) + tokenizer.encode(text) + [tokenizer.eos_id]
    model = ScriptModel(get_config("tiny-dense"), script)
    engine = NativeEngine(model, model.config, newline_ids=newline_ids(tokenizer), prefix_cache_mb=0,
                          speculative=None, max_batch=2, prefill_chunk=4096)
    # Healing off unless asked: it would replace the script's first token.
    return CompletionService(engine, tokenizer, model.config, config or ServiceConfig(token_healing=False)), model


def test_filters_stop_decoding_at_the_block_end(tiny_tokenizer):
    text = "\n    return x + 1\n\ndef g(y):\n    return y\n" * 3
    svc, _ = scripted(tiny_tokenizer, text)
    try:
        c = svc.complete(CompletionRequest("a.py", "def f(x):", "\n", max_new_tokens=64))
        assert c.text == "\n    return x + 1"
        assert c.stop_reason == "filter"
        assert c.generated_tokens < len(tiny_tokenizer.encode(text))
        off = CompletionService(svc.engine, tiny_tokenizer, svc.model_config,
                                ServiceConfig(early_stop=False, token_healing=False))
        full = off.complete(CompletionRequest("a.py", "def f(x):", "\n", max_new_tokens=64))
        assert full.text == c.text and full.generated_tokens > c.generated_tokens
    finally:
        svc.close()


def test_stop_strings_and_single_line(tiny_tokenizer):
    svc, _ = scripted(tiny_tokenizer, "total = 1  # STOP now\nnext_line()")
    try:
        c = svc.complete(CompletionRequest("a.py", "def f():\n    ", "\n", stop=["# STOP"], max_new_tokens=32))
        assert c.text == "total = 1  " and c.stop_reason == "stop_string"  # up to the stop string, as it is
        c = svc.complete(CompletionRequest("a.py", "x = 1\ny = ", "\n", max_new_tokens=32))
        assert not c.multiline and c.text == "total = 1  # STOP now"
        assert c.stop_reason == "lines"  # the engine stopped at the first newline token
    finally:
        svc.close()


def test_space_before_a_stop_string_is_kept(tiny_tokenizer):
    # OpenAI-compatible servers return the text before the stop string as it is; the client joins its own text on.
    svc, _ = scripted(tiny_tokenizer, "a + b\n")
    try:
        for suffix in (" + b\n", "\n"):  # mid-line, end of line
            req = CompletionRequest("a.py", "total = ", suffix, stop=["+ b"], max_new_tokens=16)
            c = svc.complete(req)
            assert c.text == "a " and c.stop_reason == "stop_string"
            assert "".join(svc.stream(req)) == c.text
    finally:
        svc.close()
    # Blank lines before the stop still go; and a filter's cut (the block ended) is not undone.
    svc, _ = scripted(tiny_tokenizer, "\n    return x\n\n    \n# END")
    try:
        c = svc.complete(CompletionRequest("a.py", "def f(x):", "\n", stop=["# END"], max_new_tokens=32))
        assert c.text == "\n    return x" and c.stop_reason == "stop_string"
    finally:
        svc.close()
    svc, _ = scripted(tiny_tokenizer, "\n    return x\ny = 2 # END")
    try:
        c = svc.complete(CompletionRequest("a.py", "def f(x):", "\n", stop=["# END"], max_new_tokens=32))
        assert c.text == "\n    return x"
    finally:
        svc.close()


def test_midline_completion_drops_auto_closed_bracket(tiny_tokenizer):
    svc, _ = scripted(tiny_tokenizer, "items, key)\nprint(value)")
    try:
        c = svc.complete(CompletionRequest("a.py", "value = compute(", ")\n", max_new_tokens=32))
        assert c.text == "items, key"
    finally:
        svc.close()


def test_healing_forces_a_consistent_first_token(tiny_tokenizer):
    prefix = "x = json.lo"  # ends in the token "lo"; "load", "loat", "lobals" are longer ones
    healing = ServiceConfig(token_healing=True)
    token = tiny_tokenizer.id_of
    # The script's first token "(" contradicts the typed text: the constraint must override it.
    svc, _ = scripted(tiny_tokenizer, "ad(f)\n", healing, first_ids=[token("(")])
    try:
        c = svc.complete(CompletionRequest("a.py", prefix, "\n", max_new_tokens=8, return_prompt=True))
        assert c.healed == "lo" and c.prompt.endswith("x = json.<fim_middle>")
        first = tiny_tokenizer.token_strings[c.tokens[0]]
        assert first != "(" and (first.startswith("lo") or "lo".startswith(first))
    finally:
        svc.close()
    # Re-typing the healed text, then continuing: the completion is the continuation only.
    svc, _ = scripted(tiny_tokenizer, "ad(f)\n", healing, first_ids=[token("lo")])
    try:
        c = svc.complete(CompletionRequest("a.py", prefix, "\n", max_new_tokens=8))
        assert c.raw_text.startswith("load(f)") and c.text == "ad(f)"
    finally:
        svc.close()
    # A first token that is a prefix of the healed text ("l"), then a model that would write "ist": the tokens
    # after it stay constrained until "lo" is re-typed, so the output cannot contradict the typed text.
    svc, _ = scripted(tiny_tokenizer, "ist\n", healing, first_ids=[token("l")])
    try:
        c = svc.complete(CompletionRequest("a.py", prefix, "\n", max_new_tokens=8))
        assert tiny_tokenizer.token_strings[c.tokens[0]] == "l" and c.raw_text.startswith("lo")
        assert c.stop_reason != "healing_mismatch"
    finally:
        svc.close()


def test_healing_a_trailing_newline_lets_the_model_write_the_indentation(tiny_tokenizer):
    # A cursor at the start of an empty line: the prefix ends in a lone "\n" token, which BPE training text rarely
    # has (the newline merges with the next line's indentation). Healing backs it off; the model re-types it as
    # part of a newline+indentation token, and the completion is what follows the newline.
    prefix = "def f(x):\n"
    indent = tiny_tokenizer.encode("def f(x):\n    return x\n")
    strings = [tiny_tokenizer.token_strings[i] for i in indent]
    first = next(i for i, s in zip(indent, strings) if s.startswith("\n") and s.strip(" ") != s)
    rest = tiny_tokenizer.decode(indent[indent.index(first) + 1:])
    svc, _ = scripted(tiny_tokenizer, rest, ServiceConfig(token_healing=True), first_ids=[first])
    try:
        c = svc.complete(CompletionRequest("a.py", prefix, "\n", max_new_tokens=16, multiline=False,
                                           return_prompt=True))
        assert c.healed == "\n" and c.prompt.endswith("def f(x):<fim_middle>")
        # Single-line: the engine stops at the end of the completion's line, not at the re-typed newline.
        assert c.text == "    return x" and c.stop_reason == "lines"
    finally:
        svc.close()


def test_healing_constraint_lasts_until_the_healed_text_is_retyped(tiny_tokenizer):
    table, strings = healing_table(tiny_tokenizer), tiny_tokenizer.token_strings
    healed = "\n" + " " * 8
    constraint = HealingConstraint(table, strings, healed)
    first = constraint(())
    assert first and all(strings[i].startswith(healed) or healed.startswith(strings[i]) for i in first)
    short = max((i for i in first if len(strings[i]) < len(healed)), key=lambda i: len(strings[i]))  # e.g. "\n   "
    second = constraint((short,))
    rest = healed[len(strings[short]):]
    assert second and all(strings[i].startswith(rest) or rest.startswith(strings[i]) for i in second)
    assert tiny_tokenizer.id_of("i") not in second
    covering = next(i for i in second if strings[i].startswith(rest))
    assert constraint((short, covering)) is None  # re-typed: free from here
    assert constraint((tiny_tokenizer.id_of("i"),)) is None  # diverged (the service reports the mismatch)
    assert HealingConstraint(table, strings, healed, cap=1)(()) is None  # more ids than a remote backend takes


def test_healing_a_newline_with_indentation_retypes_all_of_it(tiny_tokenizer):
    # A CRLF file: the prefix ends in "\r" + a newline+indentation token. The model's first token re-types only part
    # of the indentation ("\n    " of "\n        "), then it would write code at the wrong depth: the constraint
    # keeps it typing spaces until the healed text is complete.
    prefix = "def f(x):\r\n    for i in x:\r\n        "
    healing = ServiceConfig(token_healing=True)
    strings = tiny_tokenizer.token_strings
    last = strings[tiny_tokenizer.encode(prefix)[-1]]
    assert "\n" in last and len(last) > 2, last
    short = max((i for i, s in enumerate(strings) if last.startswith(s) and 1 < len(s) < len(last)),
                key=lambda i: len(strings[i]))
    svc, _ = scripted(tiny_tokenizer, "print(i)\r\n", healing, first_ids=[short])
    try:
        c = svc.complete(CompletionRequest("a.py", prefix, "\r\n", max_new_tokens=16, multiline=False))
        assert c.healed == last and c.raw_text.startswith(last) and c.stop_reason != "healing_mismatch"
    finally:
        svc.close()


def test_stream_yields_lines_as_they_complete(tiny_tokenizer):
    text = "\n    a = 1\n    b = 2\n    c = 3\n    return a + b + c\n"
    svc, _ = scripted(tiny_tokenizer, text)
    try:
        gen = svc.stream(CompletionRequest("a.py", "def f():", "\n", max_new_tokens=64))
        pieces = []
        with pytest.raises(StopIteration) as done:
            while True:
                pieces.append(next(gen))
        assert len(pieces) >= 3
        assert "".join(pieces) == done.value.value.text == text.rstrip()
    finally:
        svc.close()


# ---- the command ----------------------------------------------------------------------------------------------
def test_split_at_positions():
    from mellum.commands.complete import split_at

    assert split_at("ab\ncd\n", 2, 2) == ("ab\nc", "d\n")
    assert split_at("ab\ncd\n", 3, 1) == ("ab\ncd\n", "")
    assert split_at("ab\r\ncd", 1, 3) == ("ab", "\r\ncd")
    with pytest.raises(ValueError, match="line 4 is outside"):
        split_at("ab\ncd\n", 4, 1)
    with pytest.raises(ValueError, match="column 4 is outside line 1"):
        split_at("ab\ncd\n", 1, 4)
    with pytest.raises(ValueError, match="column 0"):
        split_at("ab", 1, 0)


def test_complete_command(model_dir, tmp_path, capsys):
    from mellum.cli import main

    src = tmp_path / "proj" / "store.py"
    src.parent.mkdir()
    src.write_text(CODE + "x = json.lo\n")
    line = CODE.count("\n") + 1
    rc = main(["complete", "--model", str(model_dir), "--file", str(src), "--line", str(line), "--column", "12",
               "--project", str(src.parent), "--json", "--max-new-tokens", "5", "--show-prompt"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["generated_tokens"] <= 5 and out["id"] and "total" in out["timings_ms"]
    assert "<filename>store.py\n" in out["prompt"]
    rc = main(["complete", "--model", str(model_dir), "--file", str(src), "--line", str(line), "--column", "12",
               "--project", str(src.parent), "--json", "--max-new-tokens", "5", "--kv-dtype", "float16"])
    half = json.loads(capsys.readouterr().out)
    assert rc == 0 and half["prompt_tokens"] == out["prompt_tokens"] and half["generated_tokens"] <= 5
    assert main(["complete", "--model", str(model_dir), "--file", str(src), "--line", "99", "--column", "1"]) == 2
    assert "line 99 is outside" in capsys.readouterr().err
    assert main(["complete", "--model", str(tmp_path), "--file", str(src), "--line", "1", "--column", "1"]) == 2
    assert "no model" in capsys.readouterr().err


def test_complete_command_sampling_options(model_dir, tmp_path, capsys):
    """--temperature and --seed reach SamplingParams: impossible values are refused with what is wrong (inf and nan
    were told "must be >= 0"; a seed past 64 bits failed on the engine thread with a traceback), and a tiny
    temperature samples the argmax (it overflowed the softmax to NaN)."""
    from mellum.cli import main

    src = tmp_path / "t.py"
    src.write_text(CODE)
    where = ["complete", "--model", str(model_dir), "--file", str(src), "--line", "3", "--column", "1",
             "--max-new-tokens", "3", "--json"]
    for bad, message in ((["--temperature", "nan"], "finite"), (["--temperature", "inf"], "finite"),
                         (["--temperature", "0.5", "--seed", str(2**70)], "seed must be an integer"),
                         (["--top-p", "0"], "top_p must be in (0, 1]"), (["--top-k", "-1"], "top_k must be")):
        assert main([*where, *bad]) == 2
        assert message in capsys.readouterr().err
    assert main([*where]) == 0
    greedy = json.loads(capsys.readouterr().out)
    assert main([*where, "--temperature", "1e-45", "--seed", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == greedy["tokens"]
    # --top-k 1 leaves only the most likely token to sample, at any temperature; --top-p reaches the engine too.
    assert main([*where, "--temperature", "5", "--top-k", "1", "--seed", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == greedy["tokens"]
    assert main([*where, "--temperature", "5", "--top-p", "1e-9", "--seed", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] == greedy["tokens"]


def test_complete_command_byte_order_mark_is_not_a_column(model_dir, tmp_path, capsys):
    from mellum.cli import main

    src = tmp_path / "bom.py"
    src.write_bytes("\ufeffimport os\nx = 1\n".encode("utf-8"))
    # Column 7 of line 1 is after `import`, as an editor (which hides the byte-order mark) shows it.
    rc = main(["complete", "--model", str(model_dir), "--file", str(src), "--line", "1", "--column", "7",
               "--json", "--max-new-tokens", "1", "--show-prompt"])
    assert rc == 0
    prompt = json.loads(capsys.readouterr().out)["prompt"]
    assert "<fim_suffix> os\nx = 1\n<fim_prefix>" in prompt and "\ufeff" not in prompt


def test_complete_command_refuses_a_binary_file(model_dir, tmp_path, capsys):
    from mellum.cli import main

    src = tmp_path / "utf16.py"
    src.write_bytes("x = 1\n".encode("utf-16-le"))  # valid UTF-8, but NUL bytes between the characters
    rc = main(["complete", "--model", str(model_dir), "--file", str(src), "--line", "1", "--column", "1"])
    assert rc == 2 and "binary file" in capsys.readouterr().err


def test_project_context_from_the_packer(service, tmp_path):
    (tmp_path / "pricing.py").write_text("def apply_discount(price, rate):\n    return price * (1 - rate)\n")
    (tmp_path / "main.py").write_text("from pricing import apply_discount\n\ntotal = apply_dis\n")
    prefix = "from pricing import apply_discount\n\ntotal = apply_dis"
    req = CompletionRequest(str(tmp_path / "main.py"), prefix, "\n", project_root=str(tmp_path), max_new_tokens=4,
                            return_prompt=True)
    c = service.complete(req)
    assert "pricing.py" in c.context_paths
    assert "<filename>pricing.py\ndef apply_discount" in c.prompt
    assert "<filename>main.py\n" in c.prompt  # the path relative to the project
    packer, lock = service.packer(str(tmp_path))
    assert packer.index is not None and service.packer(str(tmp_path))[0] is packer  # one index per project


def test_stream_and_complete_agree_on_repetition(tiny_tokenizer):
    text = "\n    total = load(path)\n    count = parse(total)\n" * 4
    svc, _ = scripted(tiny_tokenizer, text)
    try:
        req = CompletionRequest("a.py", "def f(path):", "\n", max_new_tokens=96)
        whole = svc.complete(req)
        assert whole.text == "\n    total = load(path)\n    count = parse(total)"
        gen = svc.stream(req)
        pieces = []
        with pytest.raises(StopIteration) as done:
            while True:
                pieces.append(next(gen))
        assert "".join(pieces) == done.value.value.text == whole.text
    finally:
        svc.close()


def test_service_from_a_model_directory(model_dir, tiny_tokenizer):
    svc = CompletionService(str(model_dir))
    try:
        assert svc.complete(CompletionRequest("a.py", "x = ", "\n", max_new_tokens=2)).generated_tokens >= 1
    finally:
        svc.close()
    with pytest.raises(ValueError, match="tokenizer"):
        CompletionService(object())


def test_healing_skipped_above_the_id_cap(tiny_tokenizer):
    svc, _ = scripted(tiny_tokenizer, "ad(f)\n", ServiceConfig(token_healing=True, max_healing_ids=2))
    try:  # "lo" would allow "lo", "l", "load", "loat", ...: more than 2 ids, so no healing
        c = svc.complete(CompletionRequest("a.py", "x = json.lo", "\n", max_new_tokens=8))
        assert c.healed == "" and c.text == "ad(f)"
    finally:
        svc.close()


def test_demo_refuses_a_project_without_its_cursors(tmp_path, capsys):
    from mellum.cli import main
    from mellum.commands.demo import REPO_EXAMPLES, SPOTS, _cut_file

    assert all(_cut_file(REPO_EXAMPLES, spot) for spot in SPOTS)  # every cursor is found in the sample project
    (tmp_path / "app.py").write_text("def total(items):\n    return sum(items)\n")
    # Another project has none of the demo's lines: a clear error, not a demo that shows nothing and succeeds.
    assert main(["demo", "--project", str(tmp_path), "--no-color"]) == 2
    assert "none of the demo's cursors" in capsys.readouterr().err


def test_complete_command_takes_a_hub_id_from_the_hub_cache(model_dir, tmp_path, monkeypatch):
    """`--model owner/name` is a hub id: here (offline) its snapshot comes from a hub cache laid out as
    huggingface_hub writes it; an id that is nowhere is a one-line error."""
    import subprocess
    import sys

    from tests.conftest import hub_cache

    env = hub_cache(tmp_path / "hub", model_dir, "someone/tiny")
    repo = tmp_path / "hub" / "models--someone--tiny"
    src = tmp_path / "t.py"
    src.write_text(CODE)
    local = subprocess.run([sys.executable, "-m", "mellum.cli", "complete", "--model", str(model_dir), "--file",
                            str(src), "--line", "3", "--column", "1", "--max-new-tokens", "4", "--json"],
                           capture_output=True, text=True, env=env, timeout=300)
    hub = subprocess.run([sys.executable, "-m", "mellum.cli", "complete", "--model", "someone/tiny", "--file",
                          str(src), "--line", "3", "--column", "1", "--max-new-tokens", "4", "--json"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert hub.returncode == 0, hub.stderr
    assert json.loads(hub.stdout)["text"] == json.loads(local.stdout)["text"]
    missing = subprocess.run([sys.executable, "-m", "mellum.cli", "complete", "--model", "someone/nothing", "--file",
                              str(src), "--line", "3", "--column", "1"], capture_output=True, text=True, env=env,
                             timeout=300, cwd=tmp_path)
    assert missing.returncode == 2 and "could not be downloaded from the hub" in missing.stderr
    assert "Traceback" not in missing.stderr
    by_env = subprocess.run([sys.executable, "-m", "mellum.cli", "complete", "--file", str(src), "--line", "3",
                             "--column", "1", "--max-new-tokens", "4", "--json"], capture_output=True, text=True,
                            env={**env, "MELLUM_MODEL": "someone/tiny"}, timeout=300, cwd=tmp_path)
    assert by_env.returncode == 0 and json.loads(by_env.stdout)["text"] == json.loads(local.stdout)["text"]
    # `hub/nope` where a folder `hub` exists is a mistyped path, not a hub id to look up; the served name of a hub
    # model is its id, not the snapshot's commit hash.
    import argparse

    from mellum.checkpoint import resolve_path
    from mellum.commands.serve import model_name

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_path("hub/nope")
    snapshot = repo / "snapshots" / "abc123"
    assert model_name(argparse.Namespace(model="someone/tiny"), snapshot) == "someone/tiny"
    assert model_name(argparse.Namespace(model=str(model_dir)), model_dir) == model_dir.name


def test_special_token_strings_in_project_code_are_counted_as_text(service, tiny_tokenizer, tmp_path):
    # ML code spells control tokens out; the prompt encodes them as characters (only the templates' tokens are
    # control tokens), so the packer must count them that way or its prompt overflows and loses its context.
    lines = [f'MARKERS_{i} = ("<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<filename>")\n' for i in range(60)]
    (tmp_path / "markers.py").write_text("".join(lines))
    prefix = "from markers import MARKERS_1\n\nstop = MARKERS_"
    (tmp_path / "main.py").write_text(prefix + "\n")
    req = CompletionRequest(str(tmp_path / "main.py"), prefix, "\n", project_root=str(tmp_path), max_new_tokens=8)
    c = service.complete(req)
    assert "markers.py" in c.context_paths
    assert not c.truncated and c.prompt_tokens <= service.window - 8
    packer, lock = service.packer(str(tmp_path))
    with lock:
        packed = packer.pack("main.py", prefix, "\n", service.window - 8)
    fmt = get_format("mellum")
    encoded = tiny_tokenizer.encode_segments(fmt.segments("main.py", packed.prefix, packed.suffix, packed.pieces))
    assert packed.pieces and packed.tokens_used == len(encoded) <= packed.budget
    for piece in packed.pieces:
        assert piece.tokens == len(tiny_tokenizer.encode_segments(fmt.context_segments([piece])))
