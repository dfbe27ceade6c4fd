"""Telemetry store: a SQLite (WAL) log of served completions and what the developer did with them.

Each completion is recorded with the context needed to rebuild a training pair later (path, prefix, suffix,
context files, the exact prompt), and every editor event about it (shown, accepted, partially accepted,
rejected) is appended as a row, once: a client that sends an event again (a retry after a timeout) finds it
already on record. `record_*` returns only after the transaction is committed with `synchronous=FULL`, so an
event the server has acknowledged survives a crash or `kill -9` of the server.

`export_preferences` turns the log into DPO pairs (Mellum paper: DPO on real-world feedback): for one context
(same file, prefix and suffix), a completion the developer accepted (or the code they typed instead) is
`chosen`, and one they rejected or were shown and ignored is `rejected`. The JSONL schema is documented in
docs/serving.md and read by `mellum train dpo`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

# Editor outcomes, from best to worst. "partial": the developer kept a prefix of the suggestion (word/line
# acceptance); "ignored": shown and then typed over or dismissed without an explicit rejection.
EVENTS = ("shown", "accepted", "partial", "rejected", "ignored")
_RANK = {"accepted": 4, "partial": 3, "rejected": 2, "ignored": 1, "shown": 0}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    source TEXT NOT NULL,
    model TEXT,
    path TEXT NOT NULL,
    prefix TEXT NOT NULL,
    suffix TEXT NOT NULL,
    context TEXT NOT NULL,          -- JSON list of {"path", "text"}, in prompt order
    prompt TEXT,                    -- the exact prompt text given to the model (when known)
    context_key TEXT NOT NULL,      -- hash of (path, prefix, suffix, context): completions for one context
    text TEXT NOT NULL,             -- the completion as served
    prompt_tokens INTEGER,
    generated_tokens INTEGER,
    latency_ms REAL,
    healed TEXT                     -- prefix text token healing moved from the prompt into the model's output
);
CREATE INDEX IF NOT EXISTS completions_context ON completions(context_key);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    completion_id TEXT NOT NULL,
    event TEXT NOT NULL,
    at REAL NOT NULL,
    accepted_text TEXT,             -- the kept part for "partial" (or the whole text for "accepted")
    replacement TEXT,               -- what the developer wrote instead, when the client knows it
    client TEXT,
    event_key TEXT                  -- TelemetryEvent.key(): one row per key and completion (NULL: an older row)
);
CREATE INDEX IF NOT EXISTS events_completion ON events(completion_id);
"""
# Columns added since the first release, created on older databases when they are opened: (table, column, type).
_ADDED_COLUMNS = (("completions", "healed", "TEXT"), ("events", "event_key", "TEXT"))
# Made after the columns it covers exist. NULL keys (rows stored before event_key) never conflict.
_EVENTS_ONCE = "CREATE UNIQUE INDEX IF NOT EXISTS events_once ON events(completion_id, event_key)"


def default_path() -> Path:
    """`$MELLUM_TELEMETRY`, else `$XDG_STATE_HOME/mellum/telemetry.db` (~/.local/state/mellum/telemetry.db)."""
    if os.environ.get("MELLUM_TELEMETRY"):
        return Path(os.environ["MELLUM_TELEMETRY"])
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "mellum" / "telemetry.db"


@dataclass(frozen=True)
class TelemetryEvent:
    """One editor event about a served completion.

    `event_id` is the client's name for this one event (a UUID, say), sent again unchanged when the client retries:
    with it, two events that read the same (the same suggestion shown twice) are both kept. Without it, the event is
    known by what it says, and an event identical to one already on record for the completion is that event again.
    """

    completion_id: str
    event: str
    accepted_text: str | None = None
    replacement: str | None = None
    client: str | None = None
    event_id: str | None = None

    def __post_init__(self):
        if self.event not in EVENTS:
            raise ValueError(f"unknown telemetry event {self.event!r}; expected one of {', '.join(EVENTS)}")
        if not self.completion_id or not isinstance(self.completion_id, str):
            raise ValueError("a telemetry event needs the completion id it refers to")
        if self.event_id is not None and (not self.event_id or not isinstance(self.event_id, str)):
            raise ValueError("a telemetry event id, when given, is a non-empty string")

    def key(self) -> str:
        """What recognises this event when it comes again (per completion id): the client's id, else its content."""
        if self.event_id is not None:
            return "id:" + _clean((self.event_id,))[0]
        content = _clean((self.event, self.accepted_text, self.replacement, self.client))
        return "sha256:" + hashlib.sha256(json.dumps(content, ensure_ascii=False).encode()).hexdigest()


def context_key(path: str, prefix: str, suffix: str, context: Sequence[dict] = ()) -> str:
    """A stable hash of what the model saw: completions with the same key were answers to the same question."""
    h = hashlib.sha256()
    for part in (path, prefix, suffix, json.dumps(list(context), sort_keys=True, ensure_ascii=False)):
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:32]


class TelemetryStore:
    """Thread-safe writer/reader of the telemetry database (one connection guarded by a lock)."""

    def __init__(self, path: str | os.PathLike, busy_timeout_s: float = 30.0):
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None,
                                   timeout=busy_timeout_s)  # how long a write waits for another process's lock
        # WAL lets readers (an export) run while the server writes; FULL syncs the WAL on every commit so an
        # acknowledged event is on disk before the reply leaves.
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._migrate()
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise ValueError(f"{self.path} is not a usable mellum telemetry database ({e})") from e

    def _migrate(self) -> None:
        """Bring a database written by an older server up to this schema (in one write transaction, so two servers
        opening it at once do not both add a column)."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for table, column, type_ in _ADDED_COLUMNS:
                if column not in {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {type_}")
            self._db.execute(_EVENTS_ONCE)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> "TelemetryStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- writing -------------------------------------------------------------------------------------
    def record_completion(
        self,
        completion_id: str,
        *,
        path: str,
        prefix: str,
        suffix: str,
        text: str,
        context: Sequence[dict] = (),
        prompt: str | None = None,
        source: str = "http",
        model: str | None = None,
        prompt_tokens: int | None = None,
        generated_tokens: int | None = None,
        latency_ms: float | None = None,
        healed: str = "",
    ) -> None:
        """Record one served completion (committed on return). Re-recording an id keeps the first row.

        `healed` is the end of the prefix that token healing took off `prompt` (the model re-typed it before `text`):
        `prompt` + `healed` + `text` is what the model produced."""
        context = [{"path": c["path"], "text": c["text"]} for c in context]
        row = (
            completion_id, time.time(), source, model, path, prefix, suffix,
            json.dumps(context, ensure_ascii=False), prompt, context_key(path, prefix, suffix, context), text,
            prompt_tokens, generated_tokens, latency_ms, healed,
        )
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT OR IGNORE INTO completions (id, created, source, model, path, prefix, suffix, context, "
                    "prompt, context_key, text, prompt_tokens, generated_tokens, latency_ms, healed) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", _clean(row)
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def record_events(self, events: Iterable[TelemetryEvent]) -> list[TelemetryEvent]:
        """Append events in one transaction; returns, once they are durable, those stored by this call.

        An event already on record (`TelemetryEvent.key()`: a client's retry, or the same event twice in one batch)
        is left out: it is neither stored nor returned again. Events may refer to completions this database has not
        seen (e.g. another server instance); they are kept and simply pair with nothing at export time.
        """
        events = list(events)
        if not events:
            return []
        stored = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for e in events:
                    row = _clean((e.completion_id, e.event, time.time(), e.accepted_text, e.replacement, e.client))
                    cur = self._db.execute(
                        "INSERT INTO events (completion_id, event, at, accepted_text, replacement, client, event_key) "
                        "VALUES (?,?,?,?,?,?,?) ON CONFLICT (completion_id, event_key) DO NOTHING",
                        (*row, e.key()),
                    )
                    if cur.rowcount:
                        stored.append(e)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return stored

    def record_event(self, event: TelemetryEvent) -> bool:
        """Store one event; False when it was already on record."""
        return bool(self.record_events([event]))

    # ---- reading -------------------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """Number of completions and of events per kind (for /metrics and `mellum/status`)."""
        with self._lock:
            out = {"completions": self._db.execute("SELECT COUNT(*) FROM completions").fetchone()[0]}
            for event, n in self._db.execute("SELECT event, COUNT(*) FROM events GROUP BY event"):
                out[event] = n
        return out

    def completion(self, completion_id: str) -> dict | None:
        with self._lock:
            cur = self._db.execute("SELECT * FROM completions WHERE id = ?", (completion_id,))
            row = cur.fetchone()
            names = [d[0] for d in cur.description]
        return dict(zip(names, row)) if row else None

    def events(self, completion_id: str) -> list[dict]:
        with self._lock:
            cur = self._db.execute("SELECT * FROM events WHERE completion_id = ? ORDER BY seq", (completion_id,))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]


def recorded_reply(sent: Sequence[TelemetryEvent], stored: Sequence[TelemetryEvent]) -> dict:
    """The answer to a client that sent events (HTTP and LSP alike): all of them are on record, so a retry gets the
    answer its first try would have had; `duplicates`, when there are any, counts those that already were (stored
    and counted once, by the earlier try)."""
    reply = {"recorded": len(sent)}
    if len(stored) < len(sent):
        reply["duplicates"] = len(sent) - len(stored)
    return reply


def _clean(row: tuple) -> tuple:
    # Editors can send lone surrogates (half of a UTF-16 pair); SQLite wants valid UTF-8.
    return tuple(v.encode("utf-8", "replace").decode("utf-8") if isinstance(v, str) else v for v in row)


# ---- export ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PreferenceExportConfig:
    """What counts as a preference pair."""

    include_ignored: bool = True  # shown and never accepted counts as rejected
    include_partial: bool = True  # the kept part of a partially accepted suggestion counts as chosen
    include_typed: bool = True  # what the developer typed instead of a rejected suggestion counts as chosen
    min_partial_chars: int = 3  # a kept part with fewer non-space characters says too little to be chosen
    max_pairs_per_context: int = 8


def export_preferences(
    db: str | os.PathLike, out: str | os.PathLike, config: PreferenceExportConfig = PreferenceExportConfig()
) -> int:
    """Write DPO pairs as JSONL (atomically: temp file, then rename); returns the number of pairs.

    Every line: {"prompt", "chosen", "rejected", "path", "prefix", "suffix", "context", "context_key",
    "chosen_id", "rejected_id", "chosen_kind", "rejected_kind"}. `prompt` is the exact prompt the model saw
    (rendered with the Mellum format when the server did not record one); chosen/rejected are middles without
    an end-of-text token.
    """
    db = Path(db)
    if not db.is_file():
        raise FileNotFoundError(f"no telemetry database at {db}")
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"the output {out} is a directory; name the JSONL file to write")
    if out.exists() and out.samefile(db):
        raise ValueError(f"the output {out} is the telemetry database itself; writing it would destroy the log")
    # as_uri() percent-encodes the path: a '#', '?' or '%' in it would otherwise be read as URI syntax.
    conn = sqlite3.connect(db.resolve().as_uri() + "?mode=ro", uri=True, timeout=30)
    try:
        completions = _load_outcomes(conn)
    except sqlite3.DatabaseError as e:
        raise ValueError(f"{db} is not a readable mellum telemetry database ({e})") from e
    finally:
        conn.close()
    by_context: dict[str, list[dict]] = {}
    for c in completions:
        by_context.setdefault(c["context_key"], []).append(c)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for key in sorted(by_context):
                for pair in _pairs(by_context[key], config):
                    f.write(json.dumps(pair, ensure_ascii=False) + "\n")
                    n += 1
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; a failed export leaves no partial file behind
    return n


def _load_outcomes(conn: sqlite3.Connection) -> list[dict]:
    cur = conn.execute("SELECT * FROM completions ORDER BY created")
    names = [d[0] for d in cur.description]
    completions = {row[0]: dict(zip(names, row), events=[]) for row in cur.fetchall()}
    for cid, event, accepted_text, replacement in conn.execute(
        "SELECT completion_id, event, accepted_text, replacement FROM events ORDER BY seq"
    ):
        if cid in completions:
            completions[cid]["events"].append((event, accepted_text, replacement))
    return list(completions.values())


def _outcome(c: dict) -> tuple[str | None, str | None, str | None]:
    """(best outcome, kept text, typed replacement) of one completion; None when never shown."""
    best, kept, typed = None, None, None
    for event, accepted_text, replacement in c["events"]:
        if best is None or _RANK[event] > _RANK[best]:
            best = event
        if event == "partial" and accepted_text:
            kept = accepted_text
        if replacement:
            typed = replacement
    if best == "shown":
        best = "ignored"
    return best, kept, typed


def _pairs(group: list[dict], config: PreferenceExportConfig) -> Iterable[dict]:
    chosen: list[tuple[dict, str, str]] = []  # (completion, text, kind)
    rejected: list[tuple[dict, str, str]] = []
    for c in group:
        outcome, kept, typed = _outcome(c)
        if outcome == "accepted":
            chosen.append((c, c["text"], "accepted"))
        elif outcome == "partial" and config.include_partial:
            text = kept if kept is not None else ""
            if len("".join(text.split())) >= config.min_partial_chars and c["text"].startswith(text):
                chosen.append((c, text, "partial"))
                # The part the developer deleted was not wanted: the full suggestion loses to the kept part.
                if text != c["text"]:
                    rejected.append((c, c["text"], "partial-rest"))
        elif outcome == "rejected" or (outcome == "ignored" and config.include_ignored):
            rejected.append((c, c["text"], outcome))
        if typed and config.include_typed and outcome in ("rejected", "ignored", "partial"):
            chosen.append((c, typed, "typed"))
    seen: set[tuple[str, str]] = set()
    for (cc, ctext, ckind), (rc, rtext, rkind) in itertools.product(chosen, rejected):
        if len(seen) >= config.max_pairs_per_context:
            break
        if not ctext.strip() or ctext == rtext or (ctext, rtext) in seen:
            continue
        seen.add((ctext, rtext))
        # A recorded prompt may end before the prefix does (token healing backed off its last token, often an
        # indent): both middles start with that text again, or DPO would learn to leave it out.
        healed = (cc.get("healed") or "") if cc["prompt"] else ""
        yield {
            "prompt": cc["prompt"] or _render(cc),
            "chosen": healed + ctext,
            "rejected": healed + rtext,
            "path": cc["path"],
            "prefix": cc["prefix"],
            "suffix": cc["suffix"],
            "context": json.loads(cc["context"]),
            "context_key": cc["context_key"],
            "chosen_id": cc["id"],
            "rejected_id": rc["id"],
            "chosen_kind": ckind,
            "rejected_kind": rkind,
        }


def _render(c: dict) -> str:
    from mellum.prompt import ContextFile, get_format

    context = [ContextFile(f["path"], f["text"]) for f in json.loads(c["context"])]
    return get_format("mellum").render(c["path"], c["prefix"], c["suffix"], context)
