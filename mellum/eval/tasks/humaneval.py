"""Generation benchmarks: HumanEval (Chen et al. 2021) and EvalPlus's HumanEval+ and MBPP+ (Liu et al. 2023).

The model completes a function from its signature and docstring. HumanEval runs the original `check` tests;
the EvalPlus sets compare the candidate's outputs with the canonical solution's on the `base_input` tests
("base") and on base + `plus_input` ("plus"), with `atol` for floats, as EvalPlus does.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import replace

from mellum.eval.tasks import Benchmark, Problem, Score, read_jsonl, truncate_at

# Codex's stop sequences for HumanEval (Chen et al. 2021, §2.3): a new top-level statement ends the function.
HUMANEVAL_STOP = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert ")
# MBPP completions write whole functions (helpers included): stop at top-level test code instead.
MBPP_STOP = ("\nif __name__", "\nprint(", "\nassert ", '\n"""', "\n# Test", "\n# test")

# EvalPlus scores a few MBPP+ tasks loosely: output compared as sets, or only checked to be non-None.
MBPP_SET_EQUAL = {
    "similar_elements", "find_char_long", "common_in_nested_lists", "extract_singly", "larg_nnum",
    "intersection_array", "find_dissimilar", "Diff",
}
MBPP_NOT_NONE = {"check_str", "text_match_three", "text_starta_endb"}


class HumanEval(Benchmark):
    name = "humaneval"
    max_new_tokens = 384
    multiline = True
    stop = HUMANEVAL_STOP
    timeout_s = 10.0
    result_settings = ("timeout_s",)

    def load(self) -> list[Problem]:
        rows = read_jsonl(self.data_dir / "humaneval" / "HumanEval.jsonl.gz")
        return [
            Problem(
                task_id=row["task_id"],
                prefix=row["prompt"],
                suffix="",
                reference=row["canonical_solution"],
                meta={"test": row["test"], "entry_point": row["entry_point"]},
            )
            for row in rows
        ]

    def postprocess(self, problem: Problem, completion: str) -> str:
        return truncate_at(completion, self.stop)

    def score(self, problem: Problem, completion: str, sandbox) -> Score:
        source = f"{problem.prefix}{completion}\n\n{problem.meta['test']}\n\ncheck({problem.meta['entry_point']})\n"
        result = sandbox.run_tests(source, config=replace(sandbox.config, timeout_s=self.timeout_s))
        return Score(passed=result.ok, reason="" if result.ok else result.reason())


class _EvalPlus(Benchmark):
    """Differential testing against the canonical solution on EvalPlus's inputs."""

    file = ""
    max_new_tokens = 384
    multiline = True
    # The canonical solution runs on every input too; a few MBPP+ inputs are extreme (sum(range(10**8)),
    # 1.6M combinations of 77 items), hence the generous limits.
    timeout_s = 240.0
    result_settings = ("timeout_s",)
    memory_mb = 6144

    def load(self) -> list[Problem]:
        rows = read_jsonl(self.data_dir / "evalplus" / self.file)
        return [
            Problem(
                task_id=row["task_id"],
                prefix=row["prompt"],
                suffix="",
                reference=row["canonical_solution"],
                meta={
                    "entry_point": row["entry_point"],
                    "base_input": row["base_input"],
                    "plus_input": row["plus_input"],
                    "atol": float(row.get("atol") or 0),
                    "kinds": argument_kinds(row.get("assertion") or row["prompt"], row["entry_point"]),
                },
            )
            for row in rows
        ]

    def postprocess(self, problem: Problem, completion: str) -> str:
        return truncate_at(completion, self.stop)

    def score(self, problem: Problem, completion: str, sandbox) -> Score:
        nonce = uuid.uuid4().hex
        meta = problem.meta
        files = {
            "reference.py": problem.prefix + problem.reference,
            "candidate.py": problem.prefix + completion,
            "inputs.json": json.dumps({"base": meta["base_input"], "plus": meta["plus_input"]}),
        }
        source = _DIFFERENTIAL.replace("@ENTRY@", repr(meta["entry_point"])).replace("@ATOL@", repr(meta["atol"]))
        source = source.replace("@NONCE@", repr(nonce)).replace("@MODE@", repr(self._mode(meta["entry_point"])))
        source = source.replace("@KINDS@", repr(meta.get("kinds") or []))
        config = replace(sandbox.config, timeout_s=self.timeout_s, memory_mb=max(self.memory_mb, sandbox.config.memory_mb))
        result = sandbox.run_python(source, files=files, config=config)
        verdict = _verdict(result.stdout, nonce)
        if verdict is None:
            return Score(passed=False, reason=result.reason(), metrics={"base": 0.0})
        base_ok, plus_ok, why = verdict
        return Score(passed=plus_ok, reason="" if plus_ok else why, metrics={"base": float(base_ok)})

    def _mode(self, entry_point: str) -> str:
        return "exact"


class HumanEvalPlus(_EvalPlus):
    name = "humaneval-plus"
    file = "HumanEvalPlus-v0.1.10.jsonl.gz"
    stop = HUMANEVAL_STOP

    def _mode(self, entry_point: str) -> str:
        return "root" if entry_point == "find_zero" else "exact"  # any root of the polynomial is right


class MbppPlus(_EvalPlus):
    name = "mbpp-plus"
    file = "MbppPlus-v0.1.0.jsonl.gz"
    stop = MBPP_STOP

    def _mode(self, entry_point: str) -> str:
        if entry_point in MBPP_SET_EQUAL:
            return "set"
        return "not-none" if entry_point in MBPP_NOT_NONE else "exact"


def argument_kinds(example: str, entry_point: str) -> list[str]:
    """Per-argument types the JSON inputs lost, read from the task's own example call (`assert f((1, 2), 3j)...`).

    EvalPlus stores inputs as JSON, where tuples become lists and complex numbers strings; the example in the
    prompt shows what the function really takes. Kinds: "tuple", "tuple-deep" (nested tuples too),
    "list-of-tuple(-deep)", "set", "number" (a string that is a number), "" (as stored).
    """
    import ast

    try:
        tree = ast.parse(example.strip().strip('"').strip())
    except SyntaxError:
        return []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == entry_point:
            return [_kind(arg) for arg in node.args]
    return []


def _kind(node) -> str:
    import ast

    def has_tuple(n) -> bool:
        return any(isinstance(c, ast.Tuple) for c in ast.walk(n) if c is not n)

    if isinstance(node, ast.Tuple):
        return "tuple-deep" if has_tuple(node) else "tuple"
    if isinstance(node, ast.List) and node.elts and isinstance(node.elts[0], ast.Tuple):
        return "list-of-tuple-deep" if has_tuple(node.elts[0]) else "list-of-tuple"
    if isinstance(node, ast.Set):
        return "set"
    numbers = [c for c in ast.walk(node) if isinstance(c, ast.Constant)]
    if numbers and all(isinstance(c.value, (int, float, complex)) and not isinstance(c.value, bool) for c in numbers) \
            and all(isinstance(c, (ast.Constant, ast.UnaryOp, ast.BinOp, ast.USub, ast.UAdd, ast.Add, ast.Sub))
                    for c in ast.walk(node)):
        return "number"
    return ""


def _verdict(stdout: str, nonce: str) -> tuple[bool, bool, str] | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith(nonce):
            data = json.loads(line[len(nonce):])
            return data["base"], data["plus"], data["why"]
    return None


# The program run in the sandbox. The reference computes expected outputs before the candidate's code is even
# compiled, each call gets its own deep copy of the input, and only a line starting with the nonce is believed.
_DIFFERENTIAL = r'''
import copy, json, math, sys

sys.setrecursionlimit(10000)
ENTRY, ATOL, NONCE, MODE, KINDS = @ENTRY@, @ATOL@, @NONCE@, @MODE@, @KINDS@


def deep_tuple(value):
    return tuple(deep_tuple(v) for v in value) if isinstance(value, list) else value


def number(value):
    if not isinstance(value, str):
        return value
    for parse in (int, float, complex):
        try:
            return parse(value)
        except ValueError:
            pass
    return value


CONVERT = {
    "": lambda v: v,
    "tuple": lambda v: tuple(v) if isinstance(v, list) else v,
    "tuple-deep": deep_tuple,
    "list-of-tuple": lambda v: [tuple(x) if isinstance(x, list) else x for x in v] if isinstance(v, list) else v,
    "list-of-tuple-deep": lambda v: [deep_tuple(x) for x in v] if isinstance(v, list) else v,
    "set": lambda v: set(v) if isinstance(v, list) else v,
    "number": number,
}


def typed(inp):
    return [CONVERT[KINDS[i]](v) if i < len(KINDS) else v for i, v in enumerate(inp)]


with open("inputs.json") as f:
    INPUTS = {split: [typed(inp) for inp in rows] for split, rows in json.load(f).items()}


def load(path):
    namespace = {"__name__": path[:-3]}
    with open(path) as f:
        exec(compile(f.read(), path, "exec"), namespace)
    return namespace[ENTRY]


def same(out, exp):
    try:
        if out == exp:  # exact equality first, as EvalPlus does; only unequal values get the float tolerance
            return True
    except Exception:
        pass
    if isinstance(exp, bool) or isinstance(out, bool):
        return out == exp and type(out) is type(exp)
    if isinstance(exp, float) or isinstance(out, float):
        if not isinstance(out, (int, float)) or not isinstance(exp, (int, float)):
            return False
        if math.isnan(exp) or math.isnan(out):
            return math.isnan(exp) and math.isnan(out)
        return math.isclose(out, exp, rel_tol=1e-7, abs_tol=ATOL or 1e-6)
    if isinstance(exp, (list, tuple)) and isinstance(out, (list, tuple)):
        return type(out) is type(exp) and len(out) == len(exp) and all(same(a, b) for a, b in zip(out, exp))
    if isinstance(exp, dict) and isinstance(out, dict):
        return out.keys() == exp.keys() and all(same(out[k], exp[k]) for k in exp)
    return out == exp


def check(inp, out, exp):
    if MODE == "root":
        return abs(sum(c * out**i for i, c in enumerate(inp[0]))) <= max(ATOL, 1e-6)
    if MODE == "set":
        return set(out) == set(exp)
    if MODE == "not-none":
        return (out is not None) == (exp is not None)
    return same(out, exp)


reference = load("reference.py")
expected = {split: [reference(*copy.deepcopy(inp)) for inp in INPUTS[split]] for split in ("base", "plus")}
verdict = {"base": False, "plus": False, "why": ""}
try:
    candidate = load("candidate.py")
    verdict["base"] = True
    for split in ("base", "plus"):
        for index, (inp, exp) in enumerate(zip(INPUTS[split], expected[split])):
            try:
                out = candidate(*copy.deepcopy(inp))
                ok = check(inp, out, exp)
            except Exception as exc:
                ok, out = False, f"{type(exc).__name__}: {exc}"
            if not ok:
                verdict["why"] = f"{split} input {index}: got {repr(out)[:80]}, expected {repr(exp)[:80]}"
                verdict["base"] = verdict["base"] and split != "base"
                raise StopIteration
    verdict["plus"] = True
except StopIteration:
    pass
except BaseException as exc:
    verdict["base"] = False
    verdict["why"] = f"{type(exc).__name__}: {exc}"[:200]
print(NONCE + json.dumps(verdict))
'''
