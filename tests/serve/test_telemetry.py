"""Telemetry store: durable events, crash safety, and DPO pairs rebuilt from the log."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from mellum.serve.telemetry import (
    PreferenceExportConfig,
    TelemetryEvent,
    TelemetryStore,
    context_key,
    export_preferences,
)

CONTEXT = [{"path": "utils.py", "text": "def helper():\n    return 1\n"}]


def _served(store, cid, text, prefix="def add(a, b):\n    return ", suffix="\n", prompt=None):
    store.record_completion(
        cid, path="m.py", prefix=prefix, suffix=suffix, text=text, context=CONTEXT, prompt=prompt, model="tiny"
    )


def test_events_are_stored_and_counted(tmp_path):
    with TelemetryStore(tmp_path / "t.db") as store:
        _served(store, "c1", "a + b")
        assert len(store.record_events([TelemetryEvent("c1", "shown"), TelemetryEvent("c1", "accepted")])) == 2
        assert store.counts() == {"completions": 1, "shown": 1, "accepted": 1}
        assert [e["event"] for e in store.events("c1")] == ["shown", "accepted"]
        assert store.completion("c1")["text"] == "a + b"
        assert store.completion("nope") is None


def test_unknown_event_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown telemetry event 'clicked'"):
        TelemetryEvent("c1", "clicked")
    with pytest.raises(ValueError, match="completion id"):
        TelemetryEvent("", "shown")


def test_wal_mode_and_lone_surrogates(tmp_path):
    with TelemetryStore(tmp_path / "t.db") as store:
        _served(store, "c1", "x = '\ud800'")  # half a UTF-16 pair, as an editor may send
        assert store.completion("c1")["text"] == "x = '?'"
    import sqlite3

    assert sqlite3.connect(tmp_path / "t.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_export_pairs_accepted_against_rejected_and_ignored(tmp_path):
    db, out = tmp_path / "t.db", tmp_path / "pairs.jsonl"
    with TelemetryStore(db) as store:
        _served(store, "good", "a + b", prompt="<exact prompt>")
        _served(store, "bad", "a - b", prompt="<exact prompt>")
        _served(store, "meh", "None", prompt="<exact prompt>")
        _served(store, "other", "zzz", prefix="different context")  # no partner: no pair
        store.record_events(
            [
                TelemetryEvent("good", "shown"),
                TelemetryEvent("good", "accepted"),
                TelemetryEvent("bad", "shown"),
                TelemetryEvent("bad", "rejected"),
                TelemetryEvent("meh", "shown"),  # shown and ignored
                TelemetryEvent("other", "rejected"),
            ]
        )
    assert export_preferences(db, out) == 2
    pairs = [json.loads(line) for line in out.read_text().splitlines()]
    assert {(p["chosen"], p["rejected"], p["rejected_kind"]) for p in pairs} == {
        ("a + b", "a - b", "rejected"),
        ("a + b", "None", "ignored"),
    }
    assert all(p["prompt"] == "<exact prompt>" and p["context"] == CONTEXT for p in pairs)
    assert export_preferences(db, out, PreferenceExportConfig(include_ignored=False)) == 1


def test_export_partial_and_typed_replacement(tmp_path):
    db, out = tmp_path / "t.db", tmp_path / "pairs.jsonl"
    with TelemetryStore(db) as store:
        _served(store, "p", "a + b\n    print(a)")
        _served(store, "r", "0")
        store.record_events(
            [
                TelemetryEvent("p", "partial", accepted_text="a + b"),
                TelemetryEvent("r", "rejected", replacement="int(a) + int(b)"),
            ]
        )
    export_preferences(db, out)
    pairs = {(p["chosen_kind"], p["chosen"], p["rejected"]) for p in map(json.loads, out.read_text().splitlines())}
    assert ("partial", "a + b", "a + b\n    print(a)") in pairs  # kept part beats the full suggestion
    assert ("partial", "a + b", "0") in pairs
    assert ("typed", "int(a) + int(b)", "0") in pairs
    # Without a recorded prompt, the Mellum format is rendered from the stored pieces.
    prompt = json.loads(out.read_text().splitlines()[0])["prompt"]
    assert prompt.startswith("<filename>utils.py\n") and prompt.endswith("<fim_prefix>def add(a, b):\n    return <fim_middle>")


def test_context_key_separates_contexts():
    assert context_key("a.py", "x", "y") == context_key("a.py", "x", "y")
    assert context_key("a.py", "x", "y") != context_key("a.py", "xy", "")
    assert context_key("a.py", "x", "y") != context_key("a.py", "x", "y", CONTEXT)


def test_export_missing_db_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no telemetry database"):
        export_preferences(tmp_path / "missing.db", tmp_path / "out.jsonl")


def test_acknowledged_events_survive_kill_9(tmp_path):
    """A writer process acknowledges each event after `record_event` returns; SIGKILL loses none of them."""
    db = tmp_path / "t.db"
    script = textwrap.dedent(
        f"""
        import sys
        from mellum.serve.telemetry import TelemetryStore, TelemetryEvent
        store = TelemetryStore({str(db)!r})
        store.record_completion("c", path="a.py", prefix="p", suffix="s", text="t")
        i = 0
        while True:
            store.record_event(TelemetryEvent("c", "shown", client=str(i)))
            print(i, flush=True)
            i += 1
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    acked = -1
    for line in proc.stdout:
        acked = int(line)
        if acked >= 30:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    with TelemetryStore(db) as store:
        clients = {int(e["client"]) for e in store.events("c")}
    assert set(range(acked + 1)) <= clients


def _pair_db(db):
    with TelemetryStore(db) as store:
        _served(store, "good", "a + b")
        _served(store, "bad", "a - b")
        store.record_events([TelemetryEvent("good", "accepted"), TelemetryEvent("bad", "rejected")])


def test_export_from_a_path_with_uri_characters(tmp_path):
    # '#', '?' and '%' are URI syntax: the read-only URI must quote them, or another file is opened.
    folder = tmp_path / "run#1?x%41"
    folder.mkdir()
    _pair_db(folder / "t.db")
    assert export_preferences(folder / "t.db", tmp_path / "new" / "pairs.jsonl") == 1  # the folder is created


def test_export_never_writes_over_the_database_or_a_directory(tmp_path, monkeypatch):
    db = tmp_path / "t.db"
    _pair_db(db)
    monkeypatch.chdir(tmp_path)  # the same file named two ways
    with pytest.raises(ValueError, match="is the telemetry database itself"):
        export_preferences(db, "t.db")
    with TelemetryStore(db) as store:
        assert store.counts()["completions"] == 2
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        export_preferences(db, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp" in p.name) == []


def test_failed_export_leaves_the_old_output_and_no_temporary_file(tmp_path):
    db, out = tmp_path / "t.db", tmp_path / "pairs.jsonl"
    _pair_db(db)
    out.write_text("previous\n")
    import sqlite3

    with sqlite3.connect(db) as conn:  # a damaged row: the prompt has to be rendered from unreadable context
        conn.execute("UPDATE completions SET context = '[{'")
    with pytest.raises(ValueError):
        export_preferences(db, out)
    assert out.read_text() == "previous\n"
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_a_file_that_is_not_a_telemetry_database_is_a_clear_error(tmp_path, capsys):
    import sqlite3

    from mellum.cli import main

    junk, other = tmp_path / "junk.db", tmp_path / "other.db"
    junk.write_bytes(b"not sqlite at all " * 100)
    sqlite3.connect(other).execute("CREATE TABLE notes (x)").connection.close()
    for db in (junk, other):
        with pytest.raises(ValueError, match="not a readable mellum telemetry database"):
            export_preferences(db, tmp_path / "pairs.jsonl")
    with pytest.raises(ValueError, match="not a usable mellum telemetry database"):
        TelemetryStore(junk)
    assert main(["data", "preferences", "--telemetry", str(junk), "--out", str(tmp_path / "p.jsonl")]) == 2
    assert "mellum: error:" in capsys.readouterr().err


def test_partial_kept_part_needs_three_non_space_characters(tmp_path):
    db, out = tmp_path / "t.db", tmp_path / "pairs.jsonl"
    with TelemetryStore(db) as store:
        _served(store, "short", "a b c d")
        _served(store, "long", "a bc d")
        store.record_events(
            [
                TelemetryEvent("short", "partial", accepted_text="a b"),  # 3 characters, 2 of them code
                TelemetryEvent("long", "partial", accepted_text="a bc"),
            ]
        )
    export_preferences(db, out)
    chosen = {p["chosen"] for p in map(json.loads, out.read_text().splitlines())}
    assert chosen == {"a bc"}


def test_a_database_from_before_the_healed_column_still_records_and_exports(tmp_path):
    import sqlite3

    db, out = tmp_path / "old.db", tmp_path / "pairs.jsonl"
    with TelemetryStore(db) as store:
        _served(store, "a", "a + b", prompt="<fim_prefix>def add(a, b):\n    return <fim_middle>")
    old = sqlite3.connect(db)
    old.execute("ALTER TABLE completions DROP COLUMN healed")  # the table as an older server wrote it
    old.commit()
    old.close()
    with TelemetryStore(db) as store:
        _served(store, "r", "0", prompt="<fim_prefix>def add(a, b):\n    return <fim_middle>")
        store.record_events([TelemetryEvent("a", "accepted"), TelemetryEvent("r", "rejected")])
        assert store.completion("r")["healed"] == "" and store.completion("a")["healed"] is None
    assert export_preferences(db, out) == 1
    assert json.loads(out.read_text())["chosen"] == "a + b"


def test_a_retried_batch_is_stored_and_counted_once(tmp_path):
    """A client that resends a batch (its request timed out after the commit) must not double the events."""
    batch = [TelemetryEvent("c1", "shown", client="http"), TelemetryEvent("c1", "partial", accepted_text="a + b"),
             TelemetryEvent("c2", "rejected", replacement="a * b")]
    with TelemetryStore(tmp_path / "t.db") as store:
        _served(store, "c1", "a + b\n    print(a)")
        assert store.record_events(batch) == batch
        assert store.record_events(batch) == []  # the retry: all on record already
        assert store.record_events([batch[1], TelemetryEvent("c1", "accepted")]) == [TelemetryEvent("c1", "accepted")]
        assert store.record_event(batch[0]) is False
        assert store.counts() == {"completions": 1, "shown": 1, "partial": 1, "rejected": 1, "accepted": 1}
        assert [e["event"] for e in store.events("c1")] == ["shown", "partial", "accepted"]
        # Different content is a different event: another kept part, another client, another completion.
        more = [TelemetryEvent("c1", "partial", accepted_text="a + b\n"), TelemetryEvent("c1", "shown", client="lsp"),
                TelemetryEvent("c3", "shown", client="http")]
        assert store.record_events(more) == more
        # The same event twice in one batch is stored once.
        assert store.record_events([TelemetryEvent("c4", "shown")] * 2) == [TelemetryEvent("c4", "shown")]
        assert store.counts()["shown"] == 4


def test_client_event_ids_tell_retries_from_repeated_events(tmp_path):
    """With an id per event, the same suggestion shown twice is two events; the retry of either is neither."""
    first, second = TelemetryEvent("c1", "shown", event_id="e1"), TelemetryEvent("c1", "shown", event_id="e2")
    with TelemetryStore(tmp_path / "t.db") as store:
        assert store.record_events([first, second]) == [first, second]
        assert store.record_events([second, first]) == []
        # A client reusing its ids across completions: the id names an event of one completion.
        assert store.record_events([TelemetryEvent("c2", "shown", event_id="e1")]) != []
        assert store.counts() == {"completions": 0, "shown": 3}
    with pytest.raises(ValueError, match="event id"):
        TelemetryEvent("c1", "shown", event_id="")


def test_a_late_retry_does_not_undo_a_newer_event_in_the_export(tmp_path):
    """The export takes a completion's latest kept part: a retry of an older batch that arrives after a newer one
    (stored again, as the newest row) made the stale part the chosen text."""
    db, out = tmp_path / "t.db", tmp_path / "pairs.jsonl"
    with TelemetryStore(db) as store:
        _served(store, "p", "a + b\n    print(a)")
        _served(store, "r", "0")
        older = [TelemetryEvent("p", "partial", accepted_text="a + b"), TelemetryEvent("r", "rejected")]
        store.record_events(older)
        store.record_events([TelemetryEvent("p", "partial", accepted_text="a + b\n    print")])
        store.record_events(older)  # the first request timed out on the client's side: sent again
    export_preferences(db, out)
    chosen = {(p["chosen"], p["rejected"]) for p in map(json.loads, out.read_text().splitlines())}
    assert chosen == {("a + b\n    print", "a + b\n    print(a)"), ("a + b\n    print", "0")}


def test_a_database_from_before_event_keys_is_migrated(tmp_path):
    """Rows stored before events had keys stay as they were (retries among them included); new ones are once."""
    import sqlite3

    db, out = tmp_path / "old.db", tmp_path / "pairs.jsonl"
    with TelemetryStore(db) as store:
        _served(store, "a", "a + b")
        _served(store, "r", "0")
    old = sqlite3.connect(db)  # the events table as an older server wrote it, with a retry already in it
    old.execute("DROP INDEX events_once")
    old.execute("ALTER TABLE events DROP COLUMN event_key")
    old.executemany("INSERT INTO events (completion_id, event, at) VALUES (?, ?, 0)",
                    [("a", "shown"), ("a", "shown"), ("r", "rejected")])
    old.commit()
    old.close()
    with TelemetryStore(db) as store:
        assert store.counts() == {"completions": 2, "shown": 2, "rejected": 1}
        assert store.record_events([TelemetryEvent("a", "accepted")] * 2) == [TelemetryEvent("a", "accepted")]
        assert store.record_events([TelemetryEvent("a", "accepted")]) == []
        assert [e["event_key"] is None for e in store.events("a")] == [True, True, False]
    with TelemetryStore(db) as store:  # opening it again changes nothing
        assert store.counts() == {"completions": 2, "shown": 2, "rejected": 1, "accepted": 1}
    assert export_preferences(db, out) == 1
