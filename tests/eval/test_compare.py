"""`mellum eval compare`: two runs of the same benchmark, paired task by task."""

from __future__ import annotations

import json

import pytest

from mellum import cli
from mellum.eval.compare import compare, to_markdown


def _write_run(folder, name, title, model, rows):
    """A results file as the runner writes it: one record per task (match metrics, NLL) plus its meta file."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"task_id": t, "n": 1, "passed": int(es == 1.0), "skipped": False, "reference_nll": nll,
                         "results": [{"passed": es == 1.0, "metrics": {"exact_match": float(es == 1.0),
                                                                       "edit_similarity": es}}]})
             for t, es, nll in rows]
    (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    (folder / f"{name}.jsonl.meta.json").write_text(json.dumps({"benchmark": title, "n": 1, "model": model}))


def test_match_metrics_are_paired_over_common_tasks(tmp_path):
    old = [("t1", 0.2, 3.0), ("t2", 0.5, 2.0), ("t3", 1.0, 1.0)]
    new = [("t1", 0.4, 2.0), ("t2", 1.0, 1.5), ("t9", 0.0, 9.0)]
    _write_run(tmp_path / "a", "cceval_none", "cceval/none", "old", old)
    _write_run(tmp_path / "b", "cceval_none", "cceval/none", "new", new)
    [c] = compare(tmp_path / "a", tmp_path / "b")
    assert c["benchmark"] == "cceval/none" and c["base"] == "old (n 1)" and c["other"] == "new (n 1)"
    es = c["metrics"]["edit_similarity"]
    assert es["tasks"] == 2  # t3 and t9 are in one run only
    assert es["base"] == pytest.approx(0.35) and es["other"] == pytest.approx(0.7)
    assert es["delta"] == pytest.approx(0.35)  # (0.2 + 0.5) / 2
    assert c["metrics"]["reference_nll"]["delta"] == pytest.approx(-0.75)
    assert c["metrics"]["exact_match"]["delta"] == pytest.approx(0.5)
    # Two files of one benchmark at different settings are told apart in the table by their file names.
    _write_run(tmp_path / "a", "cceval_none_512", "cceval/none", "old", old)
    _write_run(tmp_path / "b", "cceval_none_512", "cceval/none", "new", new)
    table = to_markdown(compare(tmp_path / "a", tmp_path / "b"))
    assert "| cceval/none [cceval_none_512] | edit_similarity | 35.00 | 70.00 | +35.00 |" in table
    assert "| cceval/none [cceval_none] | edit_similarity |" in table


def test_pool_pairs_the_tasks_of_several_files_together(tmp_path):
    for side, shift in (("a", 0.0), ("b", 0.1)):  # the same task ids in both repositories: kept apart by file
        _write_run(tmp_path / side, "repo-bench_x_retrieval", "repo-bench/x/retrieval", side,
                   [("t1", 0.2 + shift, 2.0)])
        _write_run(tmp_path / side, "repo-bench_y_retrieval", "repo-bench/y/retrieval", side,
                   [("t1", 0.4 + 3 * shift, 2.0), ("t2", 0.5, 2.0)])
        _write_run(tmp_path / side, "repo-bench_y_none", "repo-bench/y/none", side, [("t1", 0.9, 1.0)])
    *files, pooled = compare(tmp_path / "a", tmp_path / "b", pools=("repo-bench_*_retrieval",))
    assert len(files) == 3 and pooled["benchmark"] == "repo-bench_*_retrieval (2 files)"
    es = pooled["metrics"]["edit_similarity"]
    assert es["tasks"] == 3 and es["delta"] == pytest.approx((0.1 + 0.3 + 0.0) / 3)
    # A pool of executed and matched tasks (SAFIM's splits) is paired on pass@1 over all of them.
    _write_run(tmp_path / "a", "exec", "safim/block", "a", [("t1", 0.5, 1.0)])
    _write_run(tmp_path / "b", "exec", "safim/block", "b", [("t1", 0.5, 1.0)])
    for side, passed in (("a", 0), ("b", 1)):
        record = json.loads((tmp_path / side / "exec.jsonl").read_text())
        record.update(passed=passed, results=[{"passed": bool(passed)}])  # executed: no match metrics
        (tmp_path / side / "exec.jsonl").write_text(json.dumps(record) + "\n")
    mixed = compare(tmp_path / "a", tmp_path / "b", pools=("*",))[-1]
    assert mixed["metrics"]["pass@1"]["tasks"] == 5 and mixed["metrics"]["pass@1"]["delta"] == pytest.approx(1 / 5)
    assert mixed["metrics"]["edit_similarity"]["tasks"] == 4
    with pytest.raises(ValueError, match="matches none"):
        compare(tmp_path / "a", tmp_path / "b", pools=("cceval_*",))


def test_runs_of_different_benchmarks_or_nothing_in_common_are_refused(tmp_path):
    _write_run(tmp_path / "a", "x", "cceval/none", "m", [("t1", 0.2, 3.0)])
    _write_run(tmp_path / "b", "x", "cceval/provided", "m", [("t1", 0.2, 3.0)])
    _write_run(tmp_path / "c", "y", "cceval/none", "m", [("t1", 0.2, 3.0)])
    with pytest.raises(ValueError, match="different benchmarks"):
        compare(tmp_path / "a", tmp_path / "b")
    with pytest.raises(ValueError, match="share no results file"):
        compare(tmp_path / "a", tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="no results"):
        compare(tmp_path / "a", tmp_path / "nowhere")


def test_cli_compares_an_oracle_and_an_empty_run(shared_benchmarks, tmp_path, capsys):
    common = ["eval", "humaneval-infilling", "--split", "single-line", "--limit", "5", "--quiet", "--no-plots",
              "--data", str(shared_benchmarks), "--out", str(tmp_path)]
    assert cli.main(common + ["--oracle"]) == 0
    assert cli.main(common + ["--check", "empty"]) == 0
    capsys.readouterr()
    out_json = tmp_path / "compare.json"
    argv = ["eval", "compare", str(tmp_path / "oracle"), str(tmp_path / "empty"), "--json", str(out_json)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| humaneval-infilling/single-line | pass@1 | 100.00 |" in printed
    [c] = json.loads(out_json.read_text())["comparisons"]
    results = tmp_path / "empty" / "humaneval-infilling_single-line.jsonl"
    empty = [json.loads(line) for line in results.read_text().splitlines()]
    passed = sum(r["passed"] for r in empty) / len(empty)
    assert c["metrics"]["pass@1"]["tasks"] == 5
    # The oracle passes every task; the empty completion only where removing the line leaves a correct program.
    assert c["metrics"]["pass@1"]["delta"] == pytest.approx(passed - 1.0)
    assert cli.main(["eval", "compare", str(tmp_path / "oracle"), str(tmp_path / "missing")]) == 2
    assert "no results" in capsys.readouterr().err


def test_execution_benchmark_with_nll_pairs_passes_and_likelihoods(tiny_model_dir, shared_benchmarks, tmp_path):
    def run(out):
        argv = ["eval", "humaneval-infilling", "--split", "single-line", "--limit", "3", "--quiet", "--no-plots",
                "--data", str(shared_benchmarks), "--model", str(tiny_model_dir), "--nll", "--out", str(out)]
        assert cli.main(argv) == 0
        return out / "native"

    first, again = run(tmp_path / "a"), run(tmp_path / "b")
    records = [json.loads(line) for line in (first / "humaneval-infilling_single-line.jsonl").read_text().splitlines()]
    assert all(r["reference_nll"] > 0 and r["reference_tokens"] >= 1 for r in records)
    summary = json.loads((first / "summary.json").read_text())["summaries"][0]
    assert set(summary["metrics"]) == {"pass@1", "reference_nll"}
    [c] = compare(first, again)
    assert list(c["metrics"]) == ["pass@1", "reference_nll"]
    # The same model, greedy: the same completions and likelihoods on every task.
    assert c["metrics"]["reference_nll"]["delta"] == 0.0 and c["metrics"]["pass@1"]["delta"] == 0.0
    assert c["metrics"]["reference_nll"]["base"] == pytest.approx(summary["metrics"]["reference_nll"]["value"])
