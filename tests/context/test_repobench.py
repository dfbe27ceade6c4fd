"""Repository-level task builder on the fixture project: one hidden line using a name defined in another file."""

from __future__ import annotations

import json

import pytest

from mellum.context import ContextConfig, ProjectIndex
from mellum.context.repobench import SETTINGS, build_tasks, eligible_lines

from .conftest import leaks

CONFIG = ContextConfig(max_file_bytes=20_000)


@pytest.fixture
def project(shop):
    # A second module using the shop's names, so that several lines qualify.
    (shop.root / "app" / "reports.py").write_text(
        '"""Sales reports."""\n\nfrom app import models, pricing\nfrom storage import db\n\n\n'
        "def monthly(orders):\n"
        "    rows = []\n"
        "    for order in orders:\n"
        "        net = pricing.with_tax(order.total())\n"
        "        rows.append((order.customer.email, net))\n"
        "    conn = db.connect()\n"
        "    return rows, conn\n\n\n"
        "def loyal(customers):\n"
        "    return [c for c in customers if c.loyalty_points > 100]\n"
    )
    (shop.root / "app" / "checkout.py").write_text(shop.cursor()[1] + shop.cursor()[2])  # drop the cursor marker
    return shop.root


def test_eligible_lines_use_names_defined_elsewhere(project):
    index = ProjectIndex(project, CONFIG)
    lines = {(n, word): places for n, word, places in eligible_lines(index, "app/reports.py", max_defs=4)}
    assert lines == {
        (9, "with_tax"): ["app/legacy_pricing.py", "app/pricing.py"],
        (11, "connect"): ["storage/db.py"],
    }  # imports, docstrings, definitions and lines whose names are local or unknown are not tasks


def test_tasks_hide_exactly_one_line(project, count):
    tasks = build_tasks(project, count, n_tasks=10, seed=0, budget_tokens=900, config=CONFIG, max_per_file=3)
    assert tasks
    for task in tasks:
        original = (project / task.path).read_text()
        assert task.prefix + task.groundtruth + task.suffix == original
        assert task.prefix.endswith("\n" + task.prefix.rsplit("\n", 1)[1]) and not task.prefix.rsplit("\n", 1)[1].strip()
        assert task.suffix.startswith("\n") and "\n" not in task.groundtruth and task.groundtruth.strip()
        assert task.identifier in task.groundtruth and task.path not in task.defined_in
        assert set(task.contexts) == set(SETTINGS)
        assert task.contexts["none"].pieces == []
        for name, packed in task.contexts.items():
            assert packed.tokens_used <= 900
            assert task.prefix.endswith(packed.prefix) and task.suffix.startswith(packed.suffix)
            assert all(p.path != task.path for p in packed.pieces)  # never the file itself (it holds the answer)
            assert leaks("".join(p.text for p in packed.pieces)) == []
        assert all(p.sources == ("path",) for p in task.contexts["path"].pieces)
    record = json.loads(json.dumps(tasks[0].to_dict()))
    assert {"task_id", "path", "prefix", "suffix", "groundtruth", "identifier", "contexts"} <= set(record)


def test_retrieval_finds_the_definition(project, count):
    tasks = build_tasks(project, count, n_tasks=10, seed=0, budget_tokens=1500, config=CONFIG, max_per_file=3)
    task = next(t for t in tasks if t.identifier == "connect")
    pieces = task.contexts["retrieval"].pieces
    assert any(p.path == "storage/db.py" and "def connect" in p.text for p in pieces)


def test_sampling_is_deterministic(project, count):
    ids = lambda seed: [t.task_id for t in build_tasks(project, count, n_tasks=3, seed=seed, budget_tokens=600, config=CONFIG)]
    assert ids(1) == ids(1)
    assert len(ids(1)) == 3
    assert {tuple(ids(s)) for s in range(6)} != {tuple(ids(1))}  # other seeds pick other tasks


def test_bad_arguments_are_clear_errors(project, count, tmp_path):
    with pytest.raises(ValueError, match="unknown settings"):
        build_tasks(project, count, settings=("none", "oracle"))
    with pytest.raises(ValueError, match="no python files"):
        build_tasks(tmp_path / "empty" if (tmp_path / "empty").mkdir() is None else None, count)
