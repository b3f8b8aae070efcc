"""SQL text of the PostgreSQL store: its migrations and statements, and the decoding
of what they return.

Templates: ``{s}`` = the quoted schema, ``{t}`` = the terminal statuses (text[]),
``{c}`` = the run columns of ``runs r`` (the log length computed), ``{n}`` = the log
length of run r. ``PostgresBackend._sql`` formats each once. Migrations are never
edited once released: a change is a new migration appended to ``MIGRATIONS``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import orjson

from .._types import RunStatus
from ..errors import LeaseLost, RunNotFound
from . import _rules as rules
from ._protocol import RunQuery, RunRecord
from ._registry import PG_MIGRATION

# The limited claim (migration 8), one call: a claim of a queue with limits takes a
# transaction-level advisory lock on (schema, queue) first, so limited claims of one
# queue run one at a time, each seeing what the previous one committed (every
# statement of a volatile function takes a fresh snapshot), while claims of other
# queues, unlimited claims and every other operation never wait for it. Under the
# lock it counts the live leases per slot group and the starts in the rate window,
# then walks the candidates through the gate, which mirrors ``_rules.LimitGate``:
# concurrency first, then the rate for a never-started run, ``o_held`` the earliest
# time the window frees a start for a run it held back. The candidate SELECT leaves
# out what the gate would refuse (full groups; never-started runs once the rate held
# one back, which cannot change ``o_held`` again), and is run again, after the last
# candidate seen, when a group fills up or the rate runs out: the loop sees about
# ``p_limit`` rows however long the backlog. A taken row is locked SKIP LOCKED and
# checked again, as the unlimited claim does (an unlimited claimer may race it).
CLAIM_LIMITED_FUNCTION = """
CREATE FUNCTION {s}.claim_limited(
    p_queue text, p_workflows text[], p_now double precision, p_limit integer,
    p_owner text, p_lease double precision, p_concurrency integer, p_rate integer,
    p_period double precision, p_priority boolean, p_terminal text[],
    OUT o_ids text[], OUT o_tokens bigint[], OUT o_held double precision)
LANGUAGE plpgsql AS $fn$
DECLARE
    v_keys text[] := ARRAY[]::text[];          -- slot groups with a live lease
    v_counts integer[] := ARRAY[]::integer[];  -- their leases, in the same order
    v_full text[] := ARRAY[]::text[];          -- the keyed groups that are full
    v_full_null boolean := false;              -- the unkeyed group is full
    v_starts double precision[] := ARRAY[]::double precision[];  -- ascending
    v_started_only boolean := false;
    v_resume boolean := false;
    v_prio integer; v_due double precision; v_created double precision; v_id text;
    v_again boolean; v_rows integer; v_batch integer; v_i integer; v_token bigint;
    r record; v_cur refcursor;
BEGIN
    o_ids := ARRAY[]::text[]; o_tokens := ARRAY[]::bigint[];
    IF p_limit <= 0 OR p_concurrency <= 0 THEN RETURN; END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended({q} || p_queue, 0));
    IF p_concurrency IS NOT NULL THEN
        SELECT coalesce(array_agg(b.k), ARRAY[]::text[]),
               coalesce(array_agg(b.n), ARRAY[]::integer[])
          INTO v_keys, v_counts
          FROM (SELECT concurrency_key AS k, count(*)::integer AS n FROM {s}.runs
                 WHERE queue = p_queue AND lease_owner IS NOT NULL
                   AND lease_expires_at > p_now AND status <> ALL(p_terminal)
                 GROUP BY concurrency_key) b;
        FOR v_i IN 1 .. coalesce(cardinality(v_keys), 0) LOOP
            IF v_counts[v_i] >= p_concurrency THEN
                IF v_keys[v_i] IS NULL THEN v_full_null := true;
                ELSE v_full := array_append(v_full, v_keys[v_i]);
                END IF;
            END IF;
        END LOOP;
    END IF;
    IF p_rate IS NOT NULL THEN
        SELECT coalesce(array_agg(started_at ORDER BY started_at), ARRAY[]::double precision[])
          INTO v_starts
          FROM {s}.runs WHERE queue = p_queue AND started_at > p_now - p_period;
    END IF;
    LOOP
        v_again := false; v_rows := 0; v_batch := p_limit - cardinality(o_ids) + 1;
        IF v_full_null THEN  -- keyed runs only: runs_keyed_idx, not the whole backlog
            OPEN v_cur FOR @CANDIDATES@
               AND c.concurrency_key IS NOT NULL AND c.concurrency_key <> ALL(v_full)
             @ORDER@;
        ELSE
            OPEN v_cur FOR @CANDIDATES@
               AND (c.concurrency_key IS NULL OR c.concurrency_key <> ALL(v_full))
             @ORDER@;
        END IF;
        LOOP
            FETCH v_cur INTO r;
            EXIT WHEN NOT FOUND;
            v_rows := v_rows + 1;
            v_resume := true;
            v_prio := r.prio; v_due := r.due_at; v_created := r.created_at; v_id := r.run_id;
            v_i := array_position(v_keys, r.k);
            IF p_concurrency IS NOT NULL AND v_i IS NOT NULL
               AND v_counts[v_i] >= p_concurrency THEN
                CONTINUE;  -- a full group (not selected: kept as the gate's own check)
            END IF;
            IF p_rate IS NOT NULL AND NOT r.started
               AND cardinality(v_starts) >= p_rate THEN
                o_held := least(o_held, v_starts[cardinality(v_starts) - p_rate + 1] + p_period);
                IF NOT v_started_only THEN
                    v_started_only := true; v_again := true;  -- the rate is spent
                    EXIT;
                END IF;
                CONTINUE;
            END IF;
            UPDATE {s}.runs SET status = 'RUNNING',
                   started_at = coalesce(started_at, p_now), lease_token = lease_token + 1,
                   lease_owner = p_owner, lease_expires_at = p_now + p_lease
             WHERE run_id = (SELECT x.run_id FROM {s}.runs x
                              WHERE x.run_id = r.run_id AND x.due_at <= p_now
                                AND (x.lease_expires_at IS NULL OR x.lease_expires_at <= p_now)
                                AND x.status <> ALL(p_terminal)
                                FOR UPDATE SKIP LOCKED)
            RETURNING lease_token INTO v_token;
            CONTINUE WHEN NOT FOUND;  -- taken by another claimer meanwhile
            o_ids := array_append(o_ids, r.run_id);
            o_tokens := array_append(o_tokens, v_token);
            IF p_rate IS NOT NULL AND NOT r.started THEN
                v_starts := ARRAY(SELECT u FROM unnest(array_append(v_starts, p_now)) u ORDER BY u);
            END IF;
            IF p_concurrency IS NOT NULL THEN
                IF v_i IS NULL THEN
                    v_keys := array_append(v_keys, r.k);
                    v_counts := array_append(v_counts, 1);
                    v_i := cardinality(v_keys);
                ELSE
                    v_counts[v_i] := v_counts[v_i] + 1;
                END IF;
                IF v_counts[v_i] >= p_concurrency THEN  -- the group is full: select without it
                    IF r.k IS NULL THEN v_full_null := true;
                    ELSE v_full := array_append(v_full, r.k);
                    END IF;
                    v_again := true;
                END IF;
            END IF;
            EXIT WHEN cardinality(o_ids) >= p_limit OR v_again;
        END LOOP;
        CLOSE v_cur;
        EXIT WHEN cardinality(o_ids) >= p_limit OR (NOT v_again AND v_rows < v_batch);
    END LOOP;
END
$fn$;
"""
# The candidates: claimable runs of the queue in claim order, from after the last
# one seen, leaving out what the gate would refuse; a group filter goes in between.
_CANDIDATES = """
            SELECT c.run_id, c.concurrency_key AS k, c.started_at IS NOT NULL AS started,
                   CASE WHEN p_priority THEN c.priority ELSE 0 END AS prio,
                   c.due_at, c.created_at
              FROM {s}.runs c
             WHERE c.queue = p_queue AND c.workflow = ANY(p_workflows) AND c.due_at <= p_now
               AND (c.lease_expires_at IS NULL OR c.lease_expires_at <= p_now)
               AND c.status <> ALL(p_terminal)
               AND (NOT v_started_only OR c.started_at IS NOT NULL)
               AND (NOT v_resume
                    OR (CASE WHEN p_priority THEN c.priority ELSE 0 END, c.due_at,
                        c.created_at, c.run_id) > (v_prio, v_due, v_created, v_id))"""
_ORDER = """ORDER BY CASE WHEN p_priority THEN c.priority ELSE 0 END, c.due_at,
                      c.created_at, c.run_id
             LIMIT v_batch"""
CLAIM_LIMITED_FUNCTION = CLAIM_LIMITED_FUNCTION.replace("@CANDIDATES@", _CANDIDATES).replace(
    "@ORDER@", _ORDER
)

MIGRATIONS: tuple[str, ...] = (
    # 1: initial layout
    """
CREATE TABLE {s}.runs (
    run_id text PRIMARY KEY, workflow text NOT NULL, queue text NOT NULL,
    status text NOT NULL, created_at double precision NOT NULL,
    started_at double precision, ended_at double precision, due_at double precision,
    result text, error text, log_len bigint NOT NULL DEFAULT 0,
    inbox_pos bigint NOT NULL DEFAULT 0, last_inbox_id bigint NOT NULL DEFAULT 0,
    lease_token bigint NOT NULL DEFAULT 0, lease_owner text,
    lease_expires_at double precision, cancel_requested boolean NOT NULL DEFAULT false,
    parent_id text);
CREATE INDEX runs_due_idx ON {s}.runs (queue, due_at) WHERE due_at IS NOT NULL;
CREATE INDEX runs_created_idx ON {s}.runs (created_at, run_id);
CREATE TABLE {s}.log (run_id text NOT NULL, pos bigint NOT NULL, data bytea NOT NULL,
    PRIMARY KEY (run_id, pos));
CREATE TABLE {s}.inbox (run_id text NOT NULL, id bigint NOT NULL, data bytea NOT NULL,
    PRIMARY KEY (run_id, id));
CREATE FUNCTION {s}.append_step(
    p_run_id text, p_token bigint, p_expected bigint, p_records bytea[],
    p_has_update boolean, p_status text, p_set_result boolean, p_result text,
    p_error text, p_ended_at double precision, p_inbox_pos bigint, p_release boolean,
    p_due_at double precision, p_now double precision, p_terminal text[], p_channel text,
    OUT o_code integer, OUT o_len bigint) LANGUAGE plpgsql AS $fn$
DECLARE
    v_token bigint; v_status text; v_inbox_pos bigint; v_last bigint; v_cancel boolean;
    v_due double precision; v_owner text; v_expires double precision;
    v_released boolean := false;
BEGIN
    SELECT lease_token, log_len, status, inbox_pos, last_inbox_id, cancel_requested,
           due_at, lease_owner, lease_expires_at
      INTO v_token, o_len, v_status, v_inbox_pos, v_last, v_cancel, v_due, v_owner, v_expires
      FROM {s}.runs WHERE run_id = p_run_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN o_code := 1; RETURN; END IF;            -- unknown run
    IF v_token <> p_token THEN o_code := 2; RETURN; END IF;   -- stale lease token
    IF o_len <> p_expected THEN o_code := 3; RETURN; END IF;  -- the log moved on
    INSERT INTO {s}.log (run_id, pos, data)
        SELECT p_run_id, p_expected + t.o - 1, t.d
          FROM unnest(p_records) WITH ORDINALITY AS t(d, o);
    o_len := p_expected + coalesce(cardinality(p_records), 0);
    IF p_has_update THEN
        v_status := coalesce(p_status, v_status);
        v_inbox_pos := coalesce(p_inbox_pos, v_inbox_pos);
        IF p_release OR v_status = ANY(p_terminal) THEN  -- the release rule
            v_released := true; v_owner := NULL; v_expires := NULL;
            IF v_status = ANY(p_terminal) THEN v_due := NULL;
            ELSIF v_last > v_inbox_pos OR v_cancel THEN v_due := least(p_due_at, p_now);
            ELSE v_due := p_due_at;
            END IF;
        END IF;
    END IF;
    UPDATE {s}.runs SET
        log_len = o_len, status = v_status, inbox_pos = v_inbox_pos, due_at = v_due,
        lease_owner = v_owner, lease_expires_at = v_expires,
        result = CASE WHEN p_set_result THEN p_result ELSE result END,
        error = coalesce(p_error, error), ended_at = coalesce(p_ended_at, ended_at)
     WHERE run_id = p_run_id;
    IF v_released THEN PERFORM pg_notify(p_channel, p_run_id); END IF;
    o_code := 0;
END
$fn$;
""",
    # 2: the log length is the log's own (max(pos) + 1), so a step's append is one
    # INSERT fenced by a share lock on the run row instead of an UPDATE of that row
    """
ALTER TABLE {s}.runs DROP COLUMN log_len;
CREATE OR REPLACE FUNCTION {s}.append_step(
    p_run_id text, p_token bigint, p_expected bigint, p_records bytea[],
    p_has_update boolean, p_status text, p_set_result boolean, p_result text,
    p_error text, p_ended_at double precision, p_inbox_pos bigint, p_release boolean,
    p_due_at double precision, p_now double precision, p_terminal text[], p_channel text,
    OUT o_code integer, OUT o_len bigint) LANGUAGE plpgsql AS $fn$
DECLARE
    v_token bigint; v_status text; v_inbox_pos bigint; v_last bigint; v_cancel boolean;
    v_due double precision; v_owner text; v_expires double precision;
    v_released boolean := false;
BEGIN
    SELECT lease_token, status, inbox_pos, last_inbox_id, cancel_requested,
           due_at, lease_owner, lease_expires_at
      INTO v_token, v_status, v_inbox_pos, v_last, v_cancel, v_due, v_owner, v_expires
      FROM {s}.runs WHERE run_id = p_run_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN o_code := 1; RETURN; END IF;            -- unknown run
    IF v_token <> p_token THEN o_code := 2; RETURN; END IF;   -- stale lease token
    SELECT coalesce(max(pos) + 1, 0) INTO o_len FROM {s}.log WHERE run_id = p_run_id;
    IF o_len <> p_expected THEN o_code := 3; RETURN; END IF;  -- the log moved on
    INSERT INTO {s}.log (run_id, pos, data)
        SELECT p_run_id, p_expected + t.o - 1, t.d
          FROM unnest(p_records) WITH ORDINALITY AS t(d, o);
    o_len := p_expected + coalesce(cardinality(p_records), 0);
    IF p_has_update THEN
        v_status := coalesce(p_status, v_status);
        v_inbox_pos := coalesce(p_inbox_pos, v_inbox_pos);
        IF p_release OR v_status = ANY(p_terminal) THEN  -- the release rule
            v_released := true; v_owner := NULL; v_expires := NULL;
            IF v_status = ANY(p_terminal) THEN v_due := NULL;
            ELSIF v_last > v_inbox_pos OR v_cancel THEN v_due := least(p_due_at, p_now);
            ELSE v_due := p_due_at;
            END IF;
        END IF;
        UPDATE {s}.runs SET
            status = v_status, inbox_pos = v_inbox_pos, due_at = v_due,
            lease_owner = v_owner, lease_expires_at = v_expires,
            result = CASE WHEN p_set_result THEN p_result ELSE result END,
            error = coalesce(p_error, error), ended_at = coalesce(p_ended_at, ended_at)
         WHERE run_id = p_run_id;
    END IF;
    IF v_released THEN PERFORM pg_notify(p_channel, p_run_id); END IF;
    o_code := 0;
END
$fn$;
""",
    # 3: rewrite_log (compaction). Separate statements: each sees the log as it is once
    # the run row is locked, and the INSERT reuses the positions the DELETE freed.
    """
CREATE FUNCTION {s}.rewrite_log(
    p_run_id text, p_token bigint, p_expected bigint, p_records bytea[],
    OUT o_code integer, OUT o_len bigint) LANGUAGE plpgsql AS $fn$
DECLARE
    v_token bigint;
BEGIN
    SELECT lease_token INTO v_token FROM {s}.runs WHERE run_id = p_run_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN o_code := 1; RETURN; END IF;            -- unknown run
    IF v_token <> p_token THEN o_code := 2; RETURN; END IF;   -- stale lease token
    SELECT coalesce(max(pos) + 1, 0) INTO o_len FROM {s}.log WHERE run_id = p_run_id;
    IF o_len <> p_expected THEN o_code := 3; RETURN; END IF;  -- the log moved on
    DELETE FROM {s}.log WHERE run_id = p_run_id;
    INSERT INTO {s}.log (run_id, pos, data)
        SELECT p_run_id, t.o - 1, t.d FROM unnest(p_records) WITH ORDINALITY AS t(d, o);
    o_len := coalesce(cardinality(p_records), 0);
    o_code := 0;
END
$fn$;
""",
    # 4: the failed run's error type; searches newest first per workflow. append_step
    # gains p_error_type as a new overload (17 arguments); the 16-argument one of
    # migration 2 stays for code that predates this migration.
    """
ALTER TABLE {s}.runs ADD COLUMN error_type text;
CREATE INDEX runs_wf_created_idx ON {s}.runs (workflow, created_at, run_id);
CREATE FUNCTION {s}.append_step(
    p_run_id text, p_token bigint, p_expected bigint, p_records bytea[],
    p_has_update boolean, p_status text, p_set_result boolean, p_result text,
    p_error text, p_error_type text, p_ended_at double precision, p_inbox_pos bigint,
    p_release boolean, p_due_at double precision, p_now double precision,
    p_terminal text[], p_channel text,
    OUT o_code integer, OUT o_len bigint) LANGUAGE plpgsql AS $fn$
DECLARE
    v_token bigint; v_status text; v_inbox_pos bigint; v_last bigint; v_cancel boolean;
    v_due double precision; v_owner text; v_expires double precision;
    v_released boolean := false;
BEGIN
    SELECT lease_token, status, inbox_pos, last_inbox_id, cancel_requested,
           due_at, lease_owner, lease_expires_at
      INTO v_token, v_status, v_inbox_pos, v_last, v_cancel, v_due, v_owner, v_expires
      FROM {s}.runs WHERE run_id = p_run_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN o_code := 1; RETURN; END IF;            -- unknown run
    IF v_token <> p_token THEN o_code := 2; RETURN; END IF;   -- stale lease token
    SELECT coalesce(max(pos) + 1, 0) INTO o_len FROM {s}.log WHERE run_id = p_run_id;
    IF o_len <> p_expected THEN o_code := 3; RETURN; END IF;  -- the log moved on
    INSERT INTO {s}.log (run_id, pos, data)
        SELECT p_run_id, p_expected + t.o - 1, t.d
          FROM unnest(p_records) WITH ORDINALITY AS t(d, o);
    o_len := p_expected + coalesce(cardinality(p_records), 0);
    IF p_has_update THEN
        v_status := coalesce(p_status, v_status);
        v_inbox_pos := coalesce(p_inbox_pos, v_inbox_pos);
        IF p_release OR v_status = ANY(p_terminal) THEN  -- the release rule
            v_released := true; v_owner := NULL; v_expires := NULL;
            IF v_status = ANY(p_terminal) THEN v_due := NULL;
            ELSIF v_last > v_inbox_pos OR v_cancel THEN v_due := least(p_due_at, p_now);
            ELSE v_due := p_due_at;
            END IF;
        END IF;
        UPDATE {s}.runs SET
            status = v_status, inbox_pos = v_inbox_pos, due_at = v_due,
            lease_owner = v_owner, lease_expires_at = v_expires,
            result = CASE WHEN p_set_result THEN p_result ELSE result END,
            error = coalesce(p_error, error), error_type = coalesce(p_error_type, error_type),
            ended_at = coalesce(p_ended_at, ended_at)
         WHERE run_id = p_run_id;
    END IF;
    IF v_released THEN PERFORM pg_notify(p_channel, p_run_id); END IF;
    o_code := 0;
END
$fn$;
""",
    # 5: the worker registry
    PG_MIGRATION,
    # 6: a cancel that asks for the compensations first (cancel(revert=True))
    """
ALTER TABLE {s}.runs ADD COLUMN revert_requested boolean NOT NULL DEFAULT false;
""",
    # 7: count_runs reads this index only (an index-only scan once vacuum has marked
    # the pages all-visible), never the table
    """
CREATE INDEX runs_wf_status_idx ON {s}.runs (workflow, status);
""",
    # 8: queue limits (QueueLimits). A run's priority and slot group; the starts in a
    # rate's window (one range of runs_started_idx) and the live leases per group
    # (runs_leased_idx holds leased runs only; a renewal changes neither index's
    # columns, so it stays a HOT update); the claimable runs that have a key
    # (runs_keyed_idx: a claim whose unkeyed group is full reads only those, and the
    # unkeyed runs of unlimited queues never enter it); claim_limited, the claim.
    """
ALTER TABLE {s}.runs ADD COLUMN priority integer NOT NULL DEFAULT 0,
    ADD COLUMN concurrency_key text;
CREATE INDEX runs_started_idx ON {s}.runs (queue, started_at) WHERE started_at IS NOT NULL;
CREATE INDEX runs_leased_idx ON {s}.runs (queue, concurrency_key)
    WHERE lease_owner IS NOT NULL;
CREATE INDEX runs_keyed_idx ON {s}.runs (queue, concurrency_key, due_at)
    WHERE concurrency_key IS NOT NULL;
"""
    + CLAIM_LIMITED_FUNCTION,
    # 9: published state (RunRecord.state). NULL for the runs already there: the store
    # holds no index of what they published (their logs do); the default, set after
    # the column is added so those keep NULL, is what a new run that published
    # nothing starts with, so CREATE need not name the column. append_step gains
    # p_state (18 arguments), merged into the run's state by jsonb's ||, which keeps
    # a key published as null (a JSON null instead of an object: what was published
    # cannot be held, the run goes unindexed); the 17-argument one stays for code
    # that predates it. list_runs' state term, ``state IS NULL OR state @> x``, is a
    # BitmapOr of two indexes: runs_state_idx (GIN, jsonb_path_ops: @> only, the
    # smaller kind) and runs_unindexed_idx, which holds the NULL runs only (those made
    # before; new runs never enter it). Without the second the OR is a full scan.
    # The GIN index makes an append that publishes a non-HOT update (every index of
    # the row gets an entry); the others leave state alone and stay HOT.
    """
ALTER TABLE {s}.runs ADD COLUMN state jsonb;
ALTER TABLE {s}.runs ALTER COLUMN state SET DEFAULT '{{}}'::jsonb;
CREATE INDEX runs_state_idx ON {s}.runs USING gin (state jsonb_path_ops);
CREATE INDEX runs_unindexed_idx ON {s}.runs (created_at) WHERE state IS NULL;
CREATE FUNCTION {s}.append_step(
    p_run_id text, p_token bigint, p_expected bigint, p_records bytea[],
    p_has_update boolean, p_status text, p_set_result boolean, p_result text,
    p_error text, p_error_type text, p_ended_at double precision, p_inbox_pos bigint,
    p_release boolean, p_due_at double precision, p_now double precision,
    p_terminal text[], p_channel text, p_state jsonb,
    OUT o_code integer, OUT o_len bigint) LANGUAGE plpgsql AS $fn$
DECLARE
    v_token bigint; v_status text; v_inbox_pos bigint; v_last bigint; v_cancel boolean;
    v_due double precision; v_owner text; v_expires double precision;
    v_released boolean := false;
BEGIN
    SELECT lease_token, status, inbox_pos, last_inbox_id, cancel_requested,
           due_at, lease_owner, lease_expires_at
      INTO v_token, v_status, v_inbox_pos, v_last, v_cancel, v_due, v_owner, v_expires
      FROM {s}.runs WHERE run_id = p_run_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN o_code := 1; RETURN; END IF;            -- unknown run
    IF v_token <> p_token THEN o_code := 2; RETURN; END IF;   -- stale lease token
    SELECT coalesce(max(pos) + 1, 0) INTO o_len FROM {s}.log WHERE run_id = p_run_id;
    IF o_len <> p_expected THEN o_code := 3; RETURN; END IF;  -- the log moved on
    INSERT INTO {s}.log (run_id, pos, data)
        SELECT p_run_id, p_expected + t.o - 1, t.d
          FROM unnest(p_records) WITH ORDINALITY AS t(d, o);
    o_len := p_expected + coalesce(cardinality(p_records), 0);
    IF p_has_update THEN
        v_status := coalesce(p_status, v_status);
        v_inbox_pos := coalesce(p_inbox_pos, v_inbox_pos);
        IF p_release OR v_status = ANY(p_terminal) THEN  -- the release rule
            v_released := true; v_owner := NULL; v_expires := NULL;
            IF v_status = ANY(p_terminal) THEN v_due := NULL;
            ELSIF v_last > v_inbox_pos OR v_cancel THEN v_due := least(p_due_at, p_now);
            ELSE v_due := p_due_at;
            END IF;
        END IF;
        UPDATE {s}.runs SET
            status = v_status, inbox_pos = v_inbox_pos, due_at = v_due,
            lease_owner = v_owner, lease_expires_at = v_expires,
            result = CASE WHEN p_set_result THEN p_result ELSE result END,
            error = coalesce(p_error, error), error_type = coalesce(p_error_type, error_type),
            ended_at = coalesce(p_ended_at, ended_at),
            state = CASE WHEN p_state IS NULL OR state IS NULL THEN state
                         WHEN jsonb_typeof(p_state) = 'null' THEN NULL
                         ELSE state || p_state END
         WHERE run_id = p_run_id;
    END IF;
    IF v_released THEN PERFORM pg_notify(p_channel, p_run_id); END IF;
    o_code := 0;
END
$fn$;
""",
)

LATEST_VERSION = len(MIGRATIONS)

# Statements: {s} = quoted schema, {t} = terminal statuses (text[]), {c} = the run
# columns of ``runs r`` (the log length computed), {n} = the log length of run r.
FIELDS = (
    "run_id", "workflow", "queue", "status", "created_at", "started_at", "ended_at", "due_at",
    "result", "error", "error_type", "log_len", "inbox_pos", "lease_token", "lease_owner",
    "lease_expires_at", "cancel_requested", "parent_id", "revert_requested", "priority",
    "concurrency_key", "state",
)  # fmt: skip
LOCK = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"
VERSION_TABLE = """CREATE TABLE IF NOT EXISTS {s}.schema_version (version integer PRIMARY KEY,
    applied_at double precision NOT NULL DEFAULT extract(epoch FROM now()))"""
CURRENT = "SELECT coalesce(max(version), 0) FROM {s}.schema_version"
SET_VERSION = "INSERT INTO {s}.schema_version (version) VALUES ($1)"
CREATE = """WITH ins AS (
    INSERT INTO {s}.runs (run_id, workflow, queue, status, created_at, due_at, parent_id)
    VALUES ($1, $2, $3, 'PENDING', $4, $5, $6) ON CONFLICT (run_id) DO NOTHING
    RETURNING run_id
), lg AS (INSERT INTO {s}.log (run_id, pos, data)
    SELECT run_id, 0, $7 FROM ins
    UNION ALL
    SELECT ins.run_id, t.o, t.d FROM ins, unnest($9::bytea[]) WITH ORDINALITY AS t(d, o))
SELECT pg_notify($8, run_id) FROM ins"""
# The same for a run with a priority or a slot group (migration 8's columns) or a
# published state (migration 9's: JSON text, cast, so a caller's connection with a
# jsonb codec of its own reads it the same): a run with none of them inserts what it
# did before, the columns' defaults (state: {}, published nothing).
CREATE_FULL = CREATE.replace("parent_id)", "parent_id, priority, concurrency_key, state)").replace(
    "$6)", "$6, $10, $11, $12::text::jsonb)"
)
# When an idle worker should look again (KnowsNextDue): runs_claim's (queue, due_at)
# range, the later of due time and lease expiry.
NEXT_DUE = """SELECT min(greatest(due_at, coalesce(lease_expires_at, due_at))) FROM {s}.runs
 WHERE queue = $1 AND workflow = ANY($2::text[]) AND due_at IS NOT NULL
   AND status <> ALL({t})"""
CLAIM = """WITH picked AS MATERIALIZED (
    SELECT run_id FROM {s}.runs
     WHERE queue = $1 AND workflow = ANY($2::text[]) AND due_at <= $3::float8
       AND (lease_expires_at IS NULL OR lease_expires_at <= $3::float8) AND status <> ALL({t})
     ORDER BY due_at, created_at, run_id LIMIT $4
       FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE {s}.runs r SET status = 'RUNNING', started_at = coalesce(r.started_at, $3::float8),
           lease_token = r.lease_token + 1, lease_owner = $5,
           lease_expires_at = $3::float8 + $6::float8
      FROM picked WHERE r.run_id = picked.run_id
    RETURNING r.run_id, r.lease_token, r.due_at, r.created_at
)
SELECT run_id, lease_token FROM claimed ORDER BY due_at, created_at, run_id"""
# The claim that also reads each claimed run as READ does from position 0 (the row as
# the claim left it, its whole log, its pending inbox): a worker's first read rides
# in the claim's round trip (Claim.snapshot). The log and inbox are not written by
# the claim, so the statement's snapshot of them is what a read after it would see.
_SNAPSHOT_TAIL = """SELECT {c},
    ARRAY(SELECT l.data FROM {s}.log l WHERE l.run_id = r.run_id ORDER BY l.pos) AS log_data,
    ARRAY(SELECT b.id FROM {s}.inbox b WHERE b.run_id = r.run_id AND b.id > r.inbox_pos
         ORDER BY b.id) AS inbox_ids,
    ARRAY(SELECT b.data FROM {s}.inbox b WHERE b.run_id = r.run_id AND b.id > r.inbox_pos
         ORDER BY b.id) AS inbox_data
  FROM claimed r ORDER BY r.due_at, r.created_at, r.run_id"""
CLAIM_READ = CLAIM.replace("RETURNING r.run_id, r.lease_token, r.due_at, r.created_at",
                           "RETURNING r.*").replace(
    "SELECT run_id, lease_token FROM claimed ORDER BY due_at, created_at, run_id", _SNAPSHOT_TAIL
)  # fmt: skip
# The same for a queue that orders by priority (QueueLimits(priority=True)).
CLAIM_READ_PRIORITY = CLAIM_READ.replace("ORDER BY due_at", "ORDER BY priority, due_at").replace(
    "ORDER BY r.due_at", "ORDER BY r.priority, r.due_at"
)
CLAIM_LIMITED = """SELECT o_ids, o_tokens, o_held
  FROM {s}.claim_limited($1, $2::text[], $3, $4, $5, $6, $7, $8, $9, $10, {t})"""
READ = """SELECT {c},
    ARRAY(SELECT l.data FROM {s}.log l WHERE l.run_id = r.run_id
           AND l.pos >= CASE WHEN $2::bigint < 0 THEN {n} + $2 ELSE $2 END
         ORDER BY l.pos) AS log_data,
    ARRAY(SELECT b.id FROM {s}.inbox b WHERE b.run_id = r.run_id AND b.id > r.inbox_pos
         ORDER BY b.id) AS inbox_ids,
    ARRAY(SELECT b.data FROM {s}.inbox b WHERE b.run_id = r.run_id AND b.id > r.inbox_pos
         ORDER BY b.id) AS inbox_data
FROM {s}.runs r WHERE r.run_id = $1"""
READ_PAGE = """SELECT {c},
    ARRAY(SELECT l.data FROM {s}.log l WHERE l.run_id = r.run_id
           AND l.pos >= $2::bigint AND l.pos < $3::bigint ORDER BY l.pos) AS log_data
FROM {s}.runs r WHERE r.run_id = $1"""
# append_step's 18-argument overload (migration 9): $18, the published state, JSON
# text or NULL (nothing published: the state is left as it is; see published_json).
APPEND = "SELECT o_code, o_len FROM {s}.append_step(" + ", ".join(f"${i}" for i in range(1, 18))
APPEND += ", $18::text::jsonb)"
REWRITE = "SELECT o_code, o_len FROM {s}.rewrite_log($1, $2, $3, $4)"
# Group commit: append_step for every append of a batch, in one statement (one round
# trip, one transaction), in order. Records travel flattened in $16; each append
# takes its slice [lo:hi] (lo > hi: none); $20 holds each one's published state
# (JSON text, NULL: none). Each call fences its own run and returns
# a code instead of raising, so a refused append changes nothing and the rest commit.
# The caller sorts the appends by run_id: rows are locked in that order (see RENEW).
APPEND_BATCH = """SELECT a.i, s.o_code, s.o_len
  FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::int[], $5::int[], $6::boolean[],
              $7::text[], $8::boolean[], $9::text[], $10::text[], $11::text[], $12::float8[],
              $13::bigint[], $14::boolean[], $15::float8[], $17::float8[], $20::text[])
       WITH ORDINALITY AS a(run_id, token, expected, lo, hi, has_update, status, set_result,
                            result, error, error_type, ended_at, inbox_pos, release, due_at,
                            now, state, i)
 CROSS JOIN LATERAL {s}.append_step(a.run_id, a.token, a.expected, ($16::bytea[])[a.lo:a.hi],
       a.has_update, a.status, a.set_result, a.result, a.error, a.error_type, a.ended_at,
       a.inbox_pos, a.release, a.due_at, a.now, $18::text[], $19::text, a.state::jsonb) AS s
 ORDER BY a.i"""
# The common case, records and no run update: one INSERT. The share lock on the run
# row is the fence: it conflicts with every UPDATE of the row (a claim changing the
# token waits for this append to commit, or this append sees the new token and
# inserts nothing). The length check: position expected - 1 must exist, and the
# log's primary key refuses position expected if it does (the log moved on). No
# write of the run row: a step costs about one plain insert.
APPEND_RECORDS = """INSERT INTO {s}.log (run_id, pos, data)
SELECT $1, $3::bigint + t.o - 1, t.d FROM unnest($4::bytea[]) WITH ORDINALITY AS t(d, o)
 WHERE EXISTS (SELECT FROM {s}.runs WHERE run_id = $1 AND lease_token = $2 FOR SHARE)
   AND ($3::bigint = 0 OR EXISTS (SELECT FROM {s}.log WHERE run_id = $1 AND pos = $3 - 1))"""
# The same for the usual single record, without the array (about 10% cheaper).
APPEND_ONE = """INSERT INTO {s}.log (run_id, pos, data) SELECT $1, $3::bigint, $4::bytea
 WHERE EXISTS (SELECT FROM {s}.runs WHERE run_id = $1 AND lease_token = $2 FOR SHARE)
   AND ($3::bigint = 0 OR EXISTS (SELECT FROM {s}.log WHERE run_id = $1 AND pos = $3 - 1))"""
# Why a records-only append wrote nothing, in append_step's codes (see _fenced).
FENCE = """SELECT CASE WHEN r.lease_token <> $2 THEN 2 ELSE 3 END AS o_code, {n} AS o_len
  FROM {s}.runs r WHERE r.run_id = $1"""
# The rows are locked in run_id order, as a batch of appends locks them (the only
# other statement that locks several run rows): the two cannot deadlock.
RENEW = """WITH held AS (
    SELECT r.run_id FROM {s}.runs r
      JOIN unnest($1::text[], $2::bigint[]) AS h(run_id, token) ON r.run_id = h.run_id
     WHERE r.lease_token = h.token AND r.lease_owner IS NOT NULL
     ORDER BY r.run_id FOR NO KEY UPDATE OF r
)
UPDATE {s}.runs r SET lease_expires_at = $3::float8 FROM held WHERE r.run_id = held.run_id
RETURNING r.run_id"""
RELEASE = """WITH u AS (
    UPDATE {s}.runs SET
        status = CASE WHEN status = ANY({t}) THEN status ELSE $4::text END,
        due_at = CASE WHEN status = ANY({t}) OR $4::text = ANY({t}) THEN NULL
            WHEN last_inbox_id > inbox_pos OR cancel_requested THEN least($3::float8, $5::float8)
            ELSE $3::float8 END,
        lease_owner = NULL, lease_expires_at = NULL
     WHERE run_id = $1 AND lease_token = $2 AND lease_owner IS NOT NULL
    RETURNING run_id
)
SELECT pg_notify($6, run_id) FROM u"""
DELIVER = """WITH u AS (
    UPDATE {s}.runs SET last_inbox_id = last_inbox_id + 1, due_at = $3::float8
     WHERE run_id = $1 AND status <> ALL({t})
    RETURNING run_id, last_inbox_id
), i AS (INSERT INTO {s}.inbox (run_id, id, data) SELECT run_id, last_inbox_id, $2 FROM u)
SELECT last_inbox_id, pg_notify($4, run_id) FROM u"""
CANCEL = """WITH u AS (
    UPDATE {s}.runs SET cancel_requested = true, due_at = $2::float8,
           revert_requested = revert_requested OR $4::boolean
     WHERE run_id = $1 AND status <> ALL({t}) RETURNING run_id
)
SELECT pg_notify($3, run_id) FROM u"""
REOPEN = """WITH u AS (
    UPDATE {s}.runs r SET status = 'PENDING', ended_at = NULL, result = NULL, error = NULL,
           error_type = NULL, due_at = $5::float8, lease_owner = NULL,
           lease_expires_at = NULL, cancel_requested = false, revert_requested = false
     WHERE r.run_id = $1 AND r.status = $2 AND {n} = $3::bigint RETURNING r.run_id
), d AS (DELETE FROM {s}.log WHERE run_id IN (SELECT run_id FROM u) AND pos >= $4::bigint)
SELECT pg_notify($6, run_id) FROM u"""
STATUS = "SELECT status FROM {s}.runs WHERE run_id = $1"
GET = "SELECT {c} FROM {s}.runs r WHERE r.run_id = $1"
# list_runs: WHERE terms built from the set fields of a RunQuery (see list_query);
# newest first walks runs_created_idx (or runs_wf_created_idx) backwards.
LIST = "SELECT {c} FROM {s}.runs r"
COUNT = "SELECT workflow, status, count(*) AS n FROM {s}.runs GROUP BY workflow, status"
CORRUPT = "UPDATE {s}.log SET data = $3 WHERE run_id = $1 AND pos = $2"
DROP = "DROP SCHEMA IF EXISTS {s} CASCADE"


def list_query(q: RunQuery) -> tuple[str, list[Any]]:
    """The ``list_runs`` statement template for ``q`` and its arguments: one WHERE
    term per set field, so each query shape is a plan the indexes serve."""
    where: list[str] = []
    args: list[Any] = []

    def term(text: str, value: Any) -> None:
        args.append(value)
        where.append(text.replace("?", f"${len(args)}"))

    if q.workflow is not None:
        term("r.workflow = ?", q.workflow)
    if q.statuses is not None:
        term("r.status = ANY(?::text[])", sorted(s.value for s in q.statuses))
    if q.run_ids is not None:
        term("r.run_id = ANY(?::text[])", sorted(q.run_ids))
    for column, low, high in (
        ("created_at", q.created_after, q.created_before),
        ("started_at", q.started_after, q.started_before),
        ("ended_at", q.ended_after, q.ended_before),
    ):
        if low is not None:
            term(f"r.{column} >= ?::float8", low)
        if high is not None:
            term(f"r.{column} <= ?::float8", high)
    if q.before is not None:
        args += [q.before[0], q.before[1]]
        where.append(f"(r.created_at, r.run_id) < (${len(args) - 1}::float8, ${len(args)})")
    for key, value in q.state_equals:
        contained = state_probe(key, value)
        if contained is not None:
            term("(r.state IS NULL OR r.state @> ?::text::jsonb)", contained)
    sql = LIST + (" WHERE " + " AND ".join(where) if where else "")
    sql += " ORDER BY r.created_at DESC, r.run_id DESC"
    if q.limit is not None:
        args.append(max(q.limit, 0))
        sql += f" LIMIT ${len(args)}"
    return sql, args


# Beyond this magnitude a double no longer holds every integer, and the number
# orjson writes for a float (its shortest form) may differ from the float's exact
# value, which is what Python compares an int with (see state_probe).
_EXACT = 2**53


def state_probe(key: str, value: Any) -> str | None:
    """The jsonb ``{key: value}`` (JSON text) whose containment (``@>``) in a run's
    state is ``state_equals``' (key, ``value``) term; None: no term (the query is
    wider, which a narrowing may be: the caller's filter decides).

    For a scalar, containment is equality as JSON: strings and bools compare
    exactly, numbers as numerics (1 = 1.0). jsonb holds the decimal orjson wrote,
    which is exact for every integer and float up to 2**53 in magnitude; beyond
    that the shortest form of a float may not be its exact value, so a number that
    large, or a NaN or an infinity (which orjson writes as null), gets no term, as
    do a NUL character (jsonb refuses it) and anything but a str, an int, a float
    or a bool."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not abs(value) <= _EXACT:  # NaN too
            return None
    elif not isinstance(value, str | bool):
        return None
    return state_json({key: value})  # None with a NUL: no run holds one (all NULL)


def state_json(state: Mapping[str, Any]) -> str | None:
    """``state`` as the JSON text the statements cast to jsonb; None if jsonb cannot
    hold it: a string (or key) with a NUL character, which jsonb refuses. The run is
    then left unindexed (NULL), which is always correct: its log holds the values.

    jsonb keeps a number as the decimal it was given, but writes ``1e+16`` back as
    ``10000000000000000``, which reads as an int: orjson writes a float that large
    in exponent form (only those: smaller ones have a point, tiny ones come back
    as ``0.0000001``), so such floats go as their exact decimal with a point."""
    text = orjson.dumps(state)
    if b"\\u0000" in text:  # (or a string holding a backslash then "u0000": harmless)
        return None
    if b"e+" in text:  # a float in exponent form (or a string holding "e+": harmless)
        text = orjson.dumps(_pointed(state))
    return text.decode()


def published_json(state: Mapping[str, Any] | None) -> str | None:
    """``append_step``'s ``p_state`` for an append publishing ``state``: None when it
    publishes nothing (the state is left alone), JSON ``null`` when jsonb cannot
    hold what it publishes (the run's index is dropped: see state_json)."""
    if not state:
        return None
    return state_json(state) or "null"


def _pointed(value: Any) -> Any:
    """``value`` with each float written with its point (see state_json)."""
    if isinstance(value, float):
        return (
            orjson.Fragment(f"{int(value)}.0")
            if math.isfinite(value) and abs(value) >= 1e16
            else value
        )
    if isinstance(value, Mapping):
        return {k: _pointed(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_pointed(v) for v in value]
    return value


# -- rows: what the statements above return, decoded --------------------------------


def fenced(run_id: str, expected_len: int, row: Any) -> int:
    """The new log length from ``append_step`` / ``rewrite_log``'s row, or their refusal."""
    code, length = int(row["o_code"]), row["o_len"]
    if code == 1:
        raise RunNotFound(run_id)
    if code == 2:
        raise LeaseLost(run_id)
    if code == 3:
        raise rules.log_moved(run_id, length, expected_len)
    return int(length)


def to_record(row: Any) -> RunRecord:
    fields = {k: row[k] for k in FIELDS}
    fields["status"] = RunStatus(fields["status"])
    if fields["result"] is not None:
        fields["result"] = orjson.loads(fields["result"])
    if isinstance(fields["state"], str):  # asyncpg gives jsonb as text (no codec set)
        fields["state"] = orjson.loads(fields["state"])
    return RunRecord(**fields)
