"""Runs are resumable JSONL files, one line per task; summaries and reports come out of them; the CLI drives it."""

from __future__ import annotations

import json

import pytest

from mellum import cli
from mellum.eval import runner
from mellum.eval.completer import EmptyCompleter, OracleCompleter, Sampling
from mellum.eval.report import summarize, to_markdown, write_report
from mellum.eval.sandbox import Sandbox
from mellum.eval.tasks import get_benchmark


@pytest.fixture(scope="module")
def bench(shared_benchmarks):
    return get_benchmark("humaneval-infilling", shared_benchmarks, "random-span-light")


def test_resume_runs_only_what_is_missing(bench, tmp_path):
    path = tmp_path / "r.jsonl"
    first = runner.run(bench, OracleCompleter(), path, runner.RunConfig(limit=3), Sandbox(), progress=False)
    assert [r["passed"] for r in first] == [1, 1, 1]
    # Simulate a crash in the middle of writing the fourth line.
    with open(path, "a") as f:
        f.write('{"task_id": "RandomSpanInfillingLight/HumanEval/1/0", "compl')
    again = runner.run(bench, OracleCompleter(), path, runner.RunConfig(limit=5), Sandbox(), progress=False)
    lines = path.read_text().splitlines()
    assert len(lines) == 5 and len({json.loads(l)["task_id"] for l in lines}) == 5
    assert [r["task_id"] for r in again[:3]] == [r["task_id"] for r in first]
    assert again[0]["seconds"] == first[0]["seconds"]  # kept from the first run, not recomputed


def test_resume_refuses_a_different_run(bench, tmp_path):
    path = tmp_path / "r.jsonl"
    runner.run(bench, OracleCompleter(), path, runner.RunConfig(limit=1), Sandbox(), progress=False)
    with pytest.raises(FileExistsError, match="different run"):
        runner.run(bench, EmptyCompleter(), path, runner.RunConfig(limit=1), Sandbox(), progress=False)
    fresh = runner.run(bench, EmptyCompleter(), path, runner.RunConfig(limit=1, fresh=True), Sandbox(), progress=False)
    assert fresh[0]["passed"] == 0


def test_resume_refuses_other_result_settings(bench, tmp_path):
    # A rerun with another time limit (or context budget) reused the first run's results as its own.
    path = tmp_path / "r.jsonl"
    runner.run(bench, OracleCompleter(), path, runner.RunConfig(limit=1), Sandbox(), progress=False)
    other = get_benchmark("humaneval-infilling", bench.data_dir, bench.split)
    other.timeout_s = 0.5
    with pytest.raises(FileExistsError, match="timeout_s: 10.0 → 0.5"):
        runner.run(other, OracleCompleter(), path, runner.RunConfig(limit=1), Sandbox(), progress=False)
    # A meta file written before the time limit was recorded still resumes (its absence is not a change).
    meta = path.with_name(path.name + ".meta.json")
    meta.write_text(json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "timeout_s"}))
    runner.run(bench, OracleCompleter(), path, runner.RunConfig(limit=1), Sandbox(), progress=False)


def test_run_config_rejects_nonsense():
    with pytest.raises(ValueError, match="temperature"):
        runner.RunConfig(n=5)
    with pytest.raises(ValueError, match="--workers"):
        runner.RunConfig(workers=0)
    with pytest.raises(ValueError, match="--temperature"):
        runner.RunConfig(n=2, sampling=Sampling(temperature=-1.0))
    with pytest.raises(ValueError, match="--top-p"):
        runner.RunConfig(sampling=Sampling(top_p=0.0))


def test_seeds_are_deterministic_per_task_and_sample():
    s = Sampling(0.8, 0.95, seed=3)
    assert s.seed_for("a", 0) == Sampling(0.2, 0.5, seed=3).seed_for("a", 0)
    assert len({s.seed_for("a", i) for i in range(10)} | {s.seed_for("b", 0)}) == 11


def test_summary_pass_at_k_and_report_files(tmp_path):
    records = [
        {"task_id": f"t{i}", "language": "python", "n": 4, "passed": c, "skipped": False,
         "results": [{"passed": j < c, "reason": "" if j < c else "boom"} for j in range(4)]}
        for i, c in enumerate([0, 1, 4, 2])
    ]
    summary = summarize(records, "demo", "execution", ks=(1, 2, 8))
    assert summary["metrics"]["pass@1"]["value"] == pytest.approx((0 + 0.25 + 1 + 0.5) / 4)
    assert summary["metrics"]["pass@2"]["value"] == pytest.approx((0 + 0.5 + 1 + 5 / 6) / 4)
    assert "pass@8" not in summary["metrics"]  # only 4 samples: no unbiased pass@8
    lo, hi = summary["metrics"]["pass@1"]["ci95"]
    assert lo <= summary["metrics"]["pass@1"]["value"] <= hi
    assert summary["failures"] == 3 and summary["failing_tasks"][0] == {"task_id": "t0", "reason": "boom"}
    written = write_report([summary], tmp_path / "rep", tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text())["summaries"][0]["benchmark"] == "demo"
    assert written["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| demo | pass@1 | 43.75 |" in to_markdown([summary])


def test_report_directory_collects_the_benchmarks_run_into_it(tmp_path):
    """A second benchmark into the same --out keeps the first one's summary; running one again replaces it."""
    def summary(name, passed):
        records = [{"task_id": "t", "language": "python", "n": 1, "passed": passed, "skipped": False,
                    "results": [{"passed": bool(passed), "reason": ""}]}]
        return summarize(records, name, "execution", ks=(1,))

    out = tmp_path / "rep"
    write_report([summary("a", 0)], out, plots=False)
    write_report([summary("b", 1)], out, tmp_path / "b.json", plots=False)
    write_report([summary("a", 1)], out, plots=False)
    kept = json.loads((out / "summary.json").read_text())["summaries"]
    assert [(s["benchmark"], s["metrics"]["pass@1"]["value"]) for s in kept] == [("a", 1.0), ("b", 1.0)]
    assert [s["benchmark"] for s in json.loads((tmp_path / "b.json").read_text())["summaries"]] == ["b"]
    assert "| a | pass@1 |" in (out / "summary.md").read_text() and "| b | pass@1 |" in (out / "summary.md").read_text()
    (out / "summary.json").write_text("{not json")  # a damaged file is replaced, not fatal
    write_report([summary("c", 0)], out, plots=False)
    assert [s["benchmark"] for s in json.loads((out / "summary.json").read_text())["summaries"]] == ["c"]


def test_cli_oracle_run_writes_summary_json(shared_benchmarks, tmp_path, capsys):
    out_json = tmp_path / "summary.json"
    argv = ["eval", "humaneval-infilling", "--split", "single-line", "--oracle", "--limit", "3", "--quiet",
            "--out", str(tmp_path / "out"), "--json", str(out_json), "--data", str(shared_benchmarks), "--no-plots"]
    assert cli.main(argv) == 0
    summary = json.loads(out_json.read_text())["summaries"][0]
    assert summary["benchmark"] == "humaneval-infilling/single-line"
    assert summary["metrics"]["pass@1"]["value"] == 1.0 and summary["tasks"] == 3
    assert summary["published"]["Mellum-4b-base"] == 66.21
    assert (tmp_path / "out" / "oracle" / "humaneval-infilling_single-line.jsonl").is_file()
    assert "pass@1" in capsys.readouterr().out


def test_cli_check_empty_scores_zero(shared_benchmarks, tmp_path):
    out_json = tmp_path / "summary.json"
    argv = ["eval", "safim", "--split", "control", "--lang", "python", "--check", "empty", "--limit", "3", "--quiet",
            "--out", str(tmp_path), "--json", str(out_json), "--data", str(shared_benchmarks), "--no-plots"]
    assert cli.main(argv) == 0
    summary = json.loads(out_json.read_text())["summaries"][0]
    assert summary["metrics"]["pass@1"]["value"] == 0.0 and summary["failures"] == 3


def test_cli_user_errors(shared_benchmarks, tmp_path, capsys):
    base = ["eval", "humaneval", "--oracle", "--quiet", "--out", str(tmp_path)]
    assert cli.main(base + ["--k", "5"]) == 2
    assert "--n 5" in capsys.readouterr().err
    assert cli.main(base + ["--data", str(tmp_path / "nowhere")]) == 2
    assert "benchmark data not found" in capsys.readouterr().err
    assert cli.main(["eval", "safim", "--oracle", "--lang", "cobol", "--data", str(shared_benchmarks),
                     "--out", str(tmp_path), "--quiet"]) == 2
    assert "cobol" in capsys.readouterr().err
    for timeout in ("0", "-1"):  # were: every program "timed out", or ran with the launcher's slack as the limit
        assert cli.main(base + ["--timeout", timeout, "--data", str(shared_benchmarks)]) == 2
        assert "must be positive" in capsys.readouterr().err


def test_repo_bench_hides_the_line_from_its_own_context(tmp_path):
    from mellum.eval.tasks.repo_bench import RepoBench

    repo = tmp_path / "proj"
    (repo / "pkg").mkdir(parents=True)
    marker = "secret_value_computed_here = compute_the_answer(41) + 1"
    body = "\n".join(f"def helper_{i}(x):\n    return x * {i}\n" for i in range(8))
    (repo / "pkg" / "a.py").write_text(f"{body}\n\ndef main():\n    {marker}\n    return secret_value_computed_here\n")
    (repo / "pkg" / "b.py").write_text("from pkg.a import helper_1\n\n\ndef compute_the_answer(x):\n    return x\n" * 3)
    for setting in ("none", "path", "retrieval"):
        bench = RepoBench(repo, setting, tasks=40, budget=2048, seed=1)
        problems = bench.load()
        hidden = [p for p in problems if p.reference.strip() == marker]
        assert hidden, "the only line of a.py using a name from b.py must be a task"
        for p in hidden:
            assert marker not in p.prefix + p.suffix
            assert all(marker not in piece.text for piece in p.context)  # no leak through the project index
            assert (setting == "none") == (not p.context)
    again = RepoBench(repo, "retrieval", tasks=40, budget=2048, seed=1).load()
    assert [p.task_id for p in again] == [p.task_id for p in problems]
    score = bench.score(hidden[0], "    " + marker)
    assert score.passed and score.metrics["edit_similarity"] == 1.0


def _match_record(task_id: str, es: float, nll: float | None = None) -> dict:
    record = {"task_id": task_id, "language": "python", "n": 1, "passed": 0, "skipped": False,
              "results": [{"passed": False, "reason": "mismatch", "metrics": {"exact_match": 0.0, "edit_similarity": es}}]}
    if nll is not None:
        record["reference_nll"] = nll
    return record


def test_paired_differences_are_per_task_and_only_over_common_tasks():
    from mellum.eval.report import paired_differences

    base = [_match_record("a", 0.2, 3.0), _match_record("b", 0.5, 2.0), _match_record("c", 0.9, 1.0)]
    other = [_match_record("a", 0.3, 2.5), _match_record("b", 0.7, 1.5), _match_record("d", 0.0, 9.0)]
    diff = paired_differences(base, other)
    assert diff["edit_similarity"]["tasks"] == 2
    assert diff["edit_similarity"]["delta"] == pytest.approx(0.15)  # (0.1 + 0.2) / 2: task c and d are unpaired
    assert diff["reference_nll"]["delta"] == pytest.approx(-0.5)
    lo, hi = diff["reference_nll"]["ci95"]
    assert lo == hi == pytest.approx(-0.5)  # the same difference on every task: no spread to resample
    lo, hi = diff["edit_similarity"]["ci95"]
    assert 0.1 - 1e-9 <= lo < hi <= 0.2 + 1e-9


def test_reference_nll_is_summarised_in_its_own_units():
    records = [_match_record("a", 0.2, 3.0), _match_record("b", 0.5, 2.0)]
    summary = summarize(records, "cceval/python/none", scoring="match")
    assert summary["metrics"]["reference_nll"]["value"] == pytest.approx(2.5)
    text = to_markdown([summary])
    assert "| reference_nll (nats/token) | 2.500 |" in text
    assert "| edit_similarity | 35.00 |" in text


def test_nll_needs_a_model_in_process(bench, tmp_path):
    with pytest.raises(ValueError, match="--nll needs a model"):
        runner.run(bench, OracleCompleter(), tmp_path / "r.jsonl", runner.RunConfig(nll=True), Sandbox(), progress=False)


def _shapes_project(repo, scale: int):
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "shapes.py").write_text(
        "class Rectangle:\n    def __init__(self, width, height):\n        self.width = width\n"
        f"        self.height = height\n\n    def area(self):\n        return self.width * self.height * {scale}\n")
    for i in range(3):
        (repo / "pkg" / f"use_{i}.py").write_text(
            f"from pkg.shapes import Rectangle\n\n\ndef build_{i}(n):\n    shape = Rectangle(n, {i} + n)\n"
            f"    return shape.area() + {i}\n")
    return repo


def test_cli_repo_bench_with_nll_compares_settings_pairwise(tiny_model_dir, tmp_path, capsys):
    repos = [_shapes_project(tmp_path / "proj", 1), _shapes_project(tmp_path / "other", 2)]
    out = tmp_path / "out"
    code = cli.main(["eval", "repo-bench", "--repo", str(repos[0]), "--repo", str(repos[1]), "--model",
                     str(tiny_model_dir), "--tasks", "6", "--budget", "256", "--nll", "--quiet", "--no-plots",
                     "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Paired differences" in printed and "reference_nll (nats/token)" in printed
    summaries = {s["benchmark"]: s for s in json.loads((out / "native" / "summary.json").read_text())["summaries"]}
    for name in ("proj", "other"):
        none = summaries[f"repo-bench/{name}/none"]
        assert none["metrics"]["reference_nll"]["value"] > 0 and "vs_base" not in none
        for setting in ("path", "retrieval"):
            gain = summaries[f"repo-bench/{name}/{setting}"]["vs_base"]
            assert gain["baseline"] == f"repo-bench/{name}/none"  # each repository against its own holes
            assert gain["metrics"]["reference_nll"]["tasks"] == none["scored"]
    pooled = summaries["repo-bench/all/retrieval"]
    both = summaries["repo-bench/proj/none"]["scored"] + summaries["repo-bench/other/none"]["scored"]
    assert pooled["scored"] == both and pooled["vs_base"]["metrics"]["edit_similarity"]["tasks"] == both
    records = [json.loads(l) for l in (out / "native" / "repo-bench_proj_none.jsonl").read_text().splitlines()]
    assert all(r["reference_nll"] > 0 and r["reference_tokens"] >= 1 for r in records)
    assert cli.main(["eval", "repo-bench", "--repo", str(repos[0]), "--repo", str(repos[0]), "--oracle", "--quiet",
                     "--out", str(out)]) == 2
    assert "different names" in capsys.readouterr().err


def test_cli_repo_bench_resume_refuses_another_budget(tmp_path, capsys):
    repo = _shapes_project(tmp_path / "proj", 1)
    base = ["eval", "repo-bench", "--repo", str(repo), "--oracle", "--tasks", "2", "--setting", "retrieval",
            "--quiet", "--no-plots", "--out", str(tmp_path / "out")]
    assert cli.main(base + ["--budget", "256"]) == 0
    capsys.readouterr()
    # Task ids do not depend on the budget: the 256-token results were reported as the 1024-token run's.
    assert cli.main(base + ["--budget", "1024"]) == 2
    assert "budget: 256 → 1024" in capsys.readouterr().err
    assert cli.main(base + ["--budget", "1024", "--fresh"]) == 0
