"""SQL text of the SQLite store: its schema, upgrades and statements.

The release rule of ``_rules.apply_release`` is written here once in SQL
(``RELEASED_DUE``), so an append with an update and a release are each one UPDATE.
"""

from __future__ import annotations

import math
from typing import Any

from .._types import RunStatus
from ._protocol import RunQuery
from ._registry import SQLITE_TABLE

TERMINAL = "(" + ", ".join(f"'{s.value}'" for s in RunStatus if s.is_terminal) + ")"

SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, workflow TEXT NOT NULL, queue TEXT NOT NULL,
    status TEXT NOT NULL, created_at REAL NOT NULL, started_at REAL, ended_at REAL,
    due_at REAL, result TEXT, error TEXT, error_type TEXT, log_len INTEGER NOT NULL DEFAULT 0,
    inbox_pos INTEGER NOT NULL DEFAULT 0, last_inbox_id INTEGER NOT NULL DEFAULT 0,
    lease_token INTEGER NOT NULL DEFAULT 0, lease_owner TEXT, lease_expires_at REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0, parent_id TEXT,
    revert_requested INTEGER NOT NULL DEFAULT 0,
    priority INTEGER NOT NULL DEFAULT 0, concurrency_key TEXT, state TEXT
);
CREATE INDEX IF NOT EXISTS runs_claim ON runs (queue, due_at);
CREATE INDEX IF NOT EXISTS runs_started ON runs (queue, started_at) WHERE started_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS runs_leased ON runs (queue, concurrency_key)
    WHERE lease_owner IS NOT NULL;
CREATE INDEX IF NOT EXISTS runs_keyed ON runs (queue, concurrency_key, due_at)
    WHERE concurrency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS runs_created ON runs (created_at, run_id);
CREATE INDEX IF NOT EXISTS runs_wf_created ON runs (workflow, created_at, run_id);
CREATE INDEX IF NOT EXISTS runs_wf_status ON runs (workflow, status);
CREATE TABLE IF NOT EXISTS log (
    run_id TEXT NOT NULL, pos INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (run_id, pos)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inbox (
    run_id TEXT NOT NULL, id INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (run_id, id)
) WITHOUT ROWID;
"""
    + SQLITE_TABLE
    + ";\n"
)

# Each step from the version before it to the next (the key), for stores made by
# older versions; a fresh store gets SCHEMA, already at SCHEMA_VERSION.
UPGRADES = {
    2: (
        "ALTER TABLE runs ADD COLUMN error_type TEXT",
        "CREATE INDEX IF NOT EXISTS runs_wf_created ON runs (workflow, created_at, run_id)",
    ),
    3: (SQLITE_TABLE,),
    4: ("ALTER TABLE runs ADD COLUMN revert_requested INTEGER NOT NULL DEFAULT 0",),
    5: ("CREATE INDEX IF NOT EXISTS runs_wf_status ON runs (workflow, status)",),
    6: (
        "ALTER TABLE runs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE runs ADD COLUMN concurrency_key TEXT",
        "CREATE INDEX IF NOT EXISTS runs_started ON runs (queue, started_at) "
        "WHERE started_at IS NOT NULL",
        "CREATE INDEX IF NOT EXISTS runs_leased ON runs (queue, concurrency_key) "
        "WHERE lease_owner IS NOT NULL",
        "CREATE INDEX IF NOT EXISTS runs_keyed ON runs (queue, concurrency_key, due_at) "
        "WHERE concurrency_key IS NOT NULL",
    ),
    # NULL for the runs already there: the store holds no index of what they
    # published (their logs do); create_run sets it for every new run
    7: ("ALTER TABLE runs ADD COLUMN state TEXT",),
}

COLS = (
    "run_id, workflow, queue, status, created_at, started_at, ended_at, due_at, result, "
    "error, error_type, log_len, inbox_pos, lease_token, lease_owner, lease_expires_at, "
    "cancel_requested, parent_id, revert_requested, priority, concurrency_key, state"
)

# The release rule of _rules.apply_release, in SQL. {st} is the run's status after
# the change, {pos} its inbox_pos after the change (UPDATE reads old column values).
RELEASED_DUE = (
    "CASE WHEN {st} IN " + TERMINAL + " THEN NULL"
    " WHEN last_inbox_id > {pos} OR cancel_requested"
    " THEN MIN(COALESCE(:due_at, :now), :now) ELSE :due_at END"
)

NEW_ST = "COALESCE(:status, status)"
NEW_POS = "COALESCE(:inbox_pos, inbox_pos)"
RELEASING = f"(:release OR {NEW_ST} IN {TERMINAL})"
FENCE = "WHERE run_id = :run_id AND lease_token = :token AND log_len = :expected"

APPEND = f"UPDATE runs SET log_len = log_len + :n {FENCE}"
REWRITE = f"UPDATE runs SET log_len = :n {FENCE}"
APPEND_UPDATE = f"""UPDATE runs SET
    log_len = log_len + :n,
    status = {NEW_ST},
    result = CASE WHEN :has_result THEN :result ELSE result END,
    error = COALESCE(:error, error),
    error_type = COALESCE(:error_type, error_type),
    ended_at = COALESCE(:ended_at, ended_at),
    inbox_pos = {NEW_POS},
    due_at = CASE WHEN {RELEASING}
        THEN {RELEASED_DUE.format(st=NEW_ST, pos=NEW_POS)} ELSE due_at END,
    lease_owner = CASE WHEN {RELEASING} THEN NULL ELSE lease_owner END,
    lease_expires_at = CASE WHEN {RELEASING} THEN NULL ELSE lease_expires_at END
{FENCE}"""
# The same for an append that publishes: the run's state merged key by key with
# :state (JSON text) by MERGE_STATE, a Python function each connection registers
# (``_sqlite_conn``): SQLite's json_patch would drop a key published as null, and
# json_set needs a JSON path per key, which SQLite 3.40 cannot write for a key
# holding a double quote. A run with no index (NULL) keeps none.
MERGE_STATE = "substantial_merged_state"
APPEND_UPDATE_STATE = APPEND_UPDATE.replace(
    "    log_len = log_len + :n,",
    f"    log_len = log_len + :n,\n    state = {MERGE_STATE}(state, :state),",
)

KEPT_ST = f"CASE WHEN status IN {TERMINAL} THEN status ELSE :status END"
RELEASE = f"""UPDATE runs SET
    status = {KEPT_ST},
    due_at = {RELEASED_DUE.format(st=KEPT_ST, pos="inbox_pos")},
    lease_owner = NULL,
    lease_expires_at = NULL
WHERE run_id = :run_id AND lease_token = :token AND lease_owner IS NOT NULL"""


REOPEN = """UPDATE runs SET status = 'PENDING', ended_at = NULL, result = NULL, error = NULL,
    error_type = NULL, due_at = ?, lease_owner = NULL, lease_expires_at = NULL,
    cancel_requested = 0, revert_requested = 0, log_len = ?
WHERE run_id = ? AND status = ? AND log_len = ?"""

FIELDS = [name.strip() for name in COLS.split(",")]

# -- claims: the claimable runs of a queue (the rule of _rules.claimable), in claim order

DUE_ORDER = "due_at, created_at, run_id"
PRIORITY_ORDER = "priority, due_at, created_at, run_id"
CLAIMABLE = (
    "queue = ? AND due_at <= ? AND workflow IN ({marks}) AND status NOT IN " + TERMINAL + " "
    "AND (lease_expires_at IS NULL OR lease_expires_at <= ?)"
)
# A limited claim's view of the queue (see _sqlite_tx.claim_limited): the slots its
# live leases hold per key (runs_leased: leased runs only, a handful), and the starts
# in the rate's window (runs_started: one range). Renewals touch neither index, nor
# runs_keyed, which holds only runs with a concurrency key: once the unkeyed group is
# full, a limited claim reads its candidates there, not the queue's whole backlog.
BUSY = (
    "SELECT concurrency_key, count(*) FROM runs WHERE queue = ? AND lease_owner IS NOT NULL "
    f"AND lease_expires_at > ? AND status NOT IN {TERMINAL} GROUP BY concurrency_key"
)
STARTS = "SELECT started_at FROM runs WHERE queue = ? AND started_at > ?"


def claim_select(workflows: int, *, priority: bool) -> str:
    """An unlimited claim's SELECT: the first ``LIMIT ?`` claimable runs, in claim
    order (by due time, or by priority first). Arguments: queue, now, the
    ``workflows`` names, now, limit."""
    order = PRIORITY_ORDER if priority else DUE_ORDER
    where = CLAIMABLE.format(marks=", ".join("?" * workflows))
    return f"SELECT run_id, lease_token FROM runs WHERE {where} ORDER BY {order} LIMIT ?"


def limited_select(
    workflows: int, *, priority: bool, full: int, full_unkeyed: bool, started_only: bool,
    resume: bool,
) -> str:  # fmt: skip
    """A limited claim's SELECT of its next candidates: claimable runs in claim order
    but for the slot groups already full (``full`` keys, and the unkeyed group if
    ``full_unkeyed``) and, once the rate held a run back (``started_only``), the
    runs that never started: those could not be taken, so the database skips them,
    not Python. ``resume``: only the runs after a candidate already seen, by claim
    order. Arguments: queue, now, the workflows, now, the full keys, the seen
    candidate's order columns (if ``resume``), limit. Rows: run_id, lease_token,
    concurrency_key, started_at, then the order columns. With the unkeyed group
    full the keyed runs are all that is left, and runs_keyed holds just those
    (named: the planner would rather walk runs_claim, unkeyed backlog and all)."""
    order = PRIORITY_ORDER if priority else DUE_ORDER
    source = "runs INDEXED BY runs_keyed" if full_unkeyed else "runs"
    where = [CLAIMABLE.format(marks=", ".join("?" * workflows))]
    if full_unkeyed:
        where.append("concurrency_key IS NOT NULL")
    if full:
        where.append(
            f"(concurrency_key IS NULL OR concurrency_key NOT IN ({', '.join('?' * full)}))"
        )
    if started_only:
        where.append("started_at IS NOT NULL")
    if resume:
        where.append(f"({order}) > ({', '.join('?' * len(order.split(',')))})")
    return (
        f"SELECT run_id, lease_token, concurrency_key, started_at, {order} FROM {source} "
        f"WHERE {' AND '.join(where)} ORDER BY {order} LIMIT ?"
    )


CLAIM = (
    "UPDATE runs SET status = 'RUNNING', started_at = COALESCE(started_at, ?), "
    "lease_token = lease_token + 1, lease_owner = ?, lease_expires_at = ? WHERE run_id = ?"
)

# count_runs: one pass over the covering index runs_wf_status, in index order (no sort,
# no table row read): about 70 ms per million runs on a small machine.
COUNT = "SELECT workflow, status, count(*) FROM runs GROUP BY workflow, status"


def list_query(q: RunQuery) -> tuple[str, list[Any]]:
    """``list_runs``' statement for ``q``: a WHERE term per set field, newest first
    (runs_created or runs_wf_created read backwards)."""
    where: list[str] = []
    args: list[Any] = []
    if q.workflow is not None:
        where.append("workflow = ?")
        args.append(q.workflow)
    for column, values in (
        ("status", None if q.statuses is None else sorted(s.value for s in q.statuses)),
        ("run_id", None if q.run_ids is None else sorted(q.run_ids)),
    ):
        if values is not None:
            where.append(f"{column} IN ({', '.join('?' * len(values))})" if values else "0")
            args += values
    for column, low, high in (
        ("created_at", q.created_after, q.created_before),
        ("started_at", q.started_after, q.started_before),
        ("ended_at", q.ended_after, q.ended_before),
    ):
        if low is not None:
            where.append(f"{column} >= ?")
            args.append(low)
        if high is not None:
            where.append(f"{column} <= ?")
            args.append(high)
    if q.before is not None:
        where.append("(created_at, run_id) < (?, ?)")
        args += [q.before[0], q.before[1]]
    for key, value in q.state_equals:
        found = state_term(value)
        if found is not None:
            where.append(f"(state IS NULL OR EXISTS (SELECT 1 FROM json_each(state) {found[0]}))")
            args += [key, *found[1]]
    sql = f"SELECT {COLS} FROM runs"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY created_at DESC, run_id DESC LIMIT ?"
    args.append(-1 if q.limit is None else max(q.limit, 0))
    return sql, args


def state_term(value: Any) -> tuple[str, list[Any]] | None:
    """The WHERE of the ``json_each(state)`` rows that let a run match ``state_equals``'
    (key, ``value``), and its arguments after the key; None: no term (the query is
    wider, which a narrowing may be: the caller's filter decides). The key is a
    parameter compared with json_each's ``key``, never spliced into a JSON path:
    no quoting to get wrong, whatever characters it holds.

    Numbers compare as SQLite reads them (1 = 1.0, as JSON), over a range one step
    of a double either side of the value, in case SQLite's reading of a stored
    number is off by one rounding step; a bool compares as 1 / 0, which is what
    json_each gives for true / false (and for the numbers 1 and 0: wider, allowed).
    Values the term could leave out a match for (a string holding NUL, a number
    too big for a double, NaN and infinities) get none."""
    where = "WHERE key = ? AND "
    if isinstance(value, bool):
        return where + "value = ?", [int(value)]
    if isinstance(value, str):
        return None if "\0" in value else (where + "type = 'text' AND value = ?", [value])
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:
            return None
        if not math.isfinite(number):
            return None
        low, high = math.nextafter(number, -math.inf), math.nextafter(number, math.inf)
        return where + "value BETWEEN ? AND ?", [low, high]
    return None
