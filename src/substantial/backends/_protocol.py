"""The storage protocol every backend implements.

Backends are *storage primitives only*: they know runs, an append-only log of
opaque byte records per run, an inbox per run, a due-time index and leases.
Durable-execution semantics (what a record means, replay, retries) live one
layer up in ``substantial._journal``, the only caller of a backend.

Every method is atomic in its store. Time is passed in by the caller as epoch
seconds (``now``), so the same rules hold on every store and tests can move
the clock; workers on several machines need NTP-synchronised clocks, like
every lease-based system.

Rules shared by every store (the conformance suite in ``tests/conformance``
checks each one):

* ``create_run`` inserts the run (status PENDING, log = [first record, *more records],
  ``due_at`` as given) unless the id exists; returns False then, changing nothing.
* A run is *claimable* when ``due_at is not None and due_at <= now`` and it is
  not leased (``lease_expires_at is None or lease_expires_at <= now``) and its
  status is not terminal and its workflow is in the claimer's set.
  ``claim_due`` takes up to ``limit`` claimable runs of one queue, oldest due
  first, sets status RUNNING (and ``started_at`` if unset), a new lease owner
  and expiry, and ``lease_token = previous + 1``. Two concurrent claimers
  never get the same run.
* ``append`` writes iff ``token == lease_token`` and ``expected_len ==
  log_len`` (else raises :class:`~substantial.errors.LeaseLost`); it then
  applies ``update`` in the same atomic step.
* Releasing (``release`` or ``append(..., update=RunUpdate(release=True))``)
  clears the lease and sets ``due_at``; but if the inbox holds an item past
  ``inbox_pos`` or a cancel is pending, ``due_at`` becomes ``now`` so a
  delivery racing with a release is never stranded. Terminal statuses clear
  ``due_at`` and the lease.
* ``deliver`` appends to the inbox with id = previous id + 1 (ids start at 1)
  and sets ``due_at = now`` (the run stays leased if it is). Unknown run:
  raises RunNotFound; terminal run: raises RunFinished.
* ``read`` returns the run, its log from ``log_from``, and inbox items with
  id > ``inbox_pos`` in id order.
* ``list_runs`` returns the runs matching a :class:`RunQuery`, newest first, a
  page at a time (``limit`` and the ``before`` cursor).
* ``subscribe`` yields ``""`` first, once every later change will be hinted.

The stores that hold runs as Python objects apply these rules through
``backends._rules`` (one implementation); the SQL and Lua stores mirror them.
Opening a store (``open``) is safe while other processes open it too, a fresh
store included.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, runtime_checkable

from .._types import RunStatus


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """A run's row: everything but its log and inbox.

    Immutable: a store's rules make a changed copy with :meth:`evolve`. (No
    ``slots``: ``evolve`` copies the instance dict, which is what makes it cheap.)
    """

    run_id: str
    workflow: str
    queue: str
    status: RunStatus
    created_at: float
    started_at: float | None = None
    ended_at: float | None = None
    due_at: float | None = None
    result: Any = None  # JSON value of a completed run
    error: str | None = None  # message of a failed run
    error_type: str | None = None  # exception type name of a failed run
    log_len: int = 0
    inbox_pos: int = 0  # id of the last inbox item moved into the log
    lease_token: int = 0
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    cancel_requested: bool = False
    parent_id: str | None = None
    revert_requested: bool = False  # the cancel asks for the compensations first
    priority: int = 0  # lower first, on a queue whose limits order by priority
    concurrency_key: str | None = None  # the slot group of a queue's concurrency limit
    # the latest value of each key the run published (c.publish), kept with the run
    # so a search by published state needs no log; None: a run the store holds no
    # such index of (made before it kept one): its log says what it published
    state: Mapping[str, Any] | None = None

    def evolve(self, **changes: Any) -> RunRecord:
        """A copy with ``changes``: ``dataclasses.replace`` without its per-field
        work, several times cheaper; the stores' rules call it on every append."""
        if not _RUN_FIELDS.issuperset(changes):
            unknown = sorted(changes.keys() - _RUN_FIELDS)
            raise TypeError(f"RunRecord has no field {unknown[0]!r}")
        new = object.__new__(RunRecord)
        state = new.__dict__
        state.update(self.__dict__)
        state.update(changes)
        return new


_RUN_FIELDS = frozenset(f.name for f in fields(RunRecord))


@dataclass(frozen=True, kw_only=True, slots=True)
class NewRun:
    run_id: str
    workflow: str
    queue: str
    first_record: bytes
    created_at: float
    due_at: float | None
    parent_id: str | None = None
    more_records: tuple[bytes, ...] = ()  # the log after first_record (a fork's prefix)
    priority: int = 0
    concurrency_key: str | None = None
    state: Mapping[str, Any] | None = None  # what more_records published (None: nothing)


@dataclass(frozen=True, kw_only=True, slots=True)
class Claim:
    """One claimed run and its lease token. ``snapshot``: a store that can read
    the run in the claim's own round trip attaches what ``read(run_id)`` would
    return right after the claim (the whole log, the pending inbox), sparing
    the worker that read; None: the worker reads it."""

    run_id: str
    token: int
    snapshot: Snapshot | None = field(default=None, compare=False, repr=False)


class Claims(list[Claim]):
    """What ``claim_due`` returns: the claims, and, when ``limits`` held back a
    run that was claimable but for a rate limit, ``held_until``: the time the
    rate's window frees its next start (so a worker tries again then, not at its
    next poll). A plain list is a ``Claims`` with nothing held back."""

    held_until: float | None

    def __init__(self, claims: Iterable[Claim] = (), *, held_until: float | None = None) -> None:
        super().__init__(claims)
        self.held_until = held_until


@dataclass(frozen=True, kw_only=True, slots=True)
class QueueLimits:
    """The limits a claim of one queue obeys (``Conductor.queue``), counted over
    every run of the queue in the store, whoever holds it:

    * ``concurrency``: at most this many runs of each *slot group* hold a live
      lease (``lease_owner`` set, ``lease_expires_at > now``) at once; a run's
      group is its ``concurrency_key`` (None: the queue's unkeyed runs form one
      group). A claim takes a run only while its group has a free slot; a dead
      worker's slots come back as its leases expire.
    * ``rate`` / ``period``: at most ``rate`` runs of the queue *start* (their
      first claim: ``started_at`` set by it) within any ``period`` seconds: a
      never-started run is claimable at ``now`` only while fewer than ``rate``
      runs of the queue have ``now - period < started_at <= now``. Runs that
      started before (resuming after a wait) are not rate limited.
    * ``priority``: candidates are taken by ``(priority, due_at, created_at,
      run_id)`` instead of ``(due_at, created_at, run_id)``.

    A run held back by a limit is skipped, not a barrier: the claim goes on to
    the next candidate (another group, a run that started before)."""

    concurrency: int | None = None
    rate: int | None = None
    period: float = 1.0
    priority: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class InboxItem:
    id: int
    data: bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class Snapshot:
    run: RunRecord
    log: list[bytes]  # records from the requested offset
    inbox: list[InboxItem]  # pending items (id > run.inbox_pos), in id order


_UNSET: Any = object()


@dataclass(frozen=True, kw_only=True, slots=True)
class RunUpdate:
    """Changes applied atomically with an append. Unset fields are left alone."""

    status: RunStatus | None = None
    result: Any = _UNSET
    error: str | None = None
    error_type: str | None = None  # set with ``error`` when a run fails
    ended_at: float | None = None
    inbox_pos: int | None = None
    release: bool = False  # drop the lease (then due_at applies)
    due_at: float | None = None  # next due time when releasing; None = wait for an event
    state: Mapping[str, Any] | None = None  # published values: merged into the run's, by key

    @property
    def has_result(self) -> bool:
        return self.result is not _UNSET


@dataclass(frozen=True, kw_only=True, slots=True)
class RunQuery:
    """What ``list_runs`` returns: the runs matching every field that is set.

    Time bounds are inclusive (``>=`` / ``<=``); a run whose ``started_at`` (or
    ``ended_at``) is None never matches a bound on it. Results come newest first,
    by ``(created_at, run_id)`` descending; ``before`` is the page cursor, the
    ``(created_at, run_id)`` of the last run a previous page returned, and only
    runs strictly after it in that order are returned. Each store pushes every
    field down to where it keeps its runs (an index, a WHERE clause).
    """

    workflow: str | None = None
    statuses: frozenset[RunStatus] | None = None
    run_ids: frozenset[str] | None = None
    created_after: float | None = None
    created_before: float | None = None
    started_after: float | None = None
    started_before: float | None = None
    ended_after: float | None = None
    ended_before: float | None = None
    limit: int | None = None
    before: tuple[float, str] | None = None
    # (key, value) pairs: only runs whose ``state[key]`` equals ``value`` (a str, an
    # int or float, or a bool), and runs whose ``state`` is None (not indexed: the
    # caller reads their logs). A store may return more (it is a narrowing: the
    # caller's filter decides), never fewer.
    state_equals: tuple[tuple[str, Any], ...] = ()


ALL_RUNS = RunQuery()


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkerRecord:
    """A worker's entry in the store's registry (``register_worker``).

    ``last_beat`` is set by the store from ``now`` on register and on each beat; the
    entry is live while ``last_beat + lease_seconds > now``."""

    worker_id: str
    host: str
    pid: int
    queues: tuple[str, ...]
    workflows: tuple[str, ...]
    started_at: float
    lease_seconds: float
    last_beat: float = 0.0


@runtime_checkable
class Backend(Protocol):
    """One store. Implementations: memory, sqlite, fs, redis, postgres."""

    async def open(self) -> None:
        """Connect / create schema. Idempotent. Called before first use."""

    async def close(self) -> None:
        """Release connections. Idempotent."""

    async def create_run(self, new: NewRun) -> bool: ...

    async def claim_due(
        self,
        *,
        queue: str,
        workflows: Collection[str],
        limit: int,
        owner: str,
        lease_seconds: float,
        now: float,
        limits: QueueLimits | None = None,
    ) -> list[Claim]:
        """Claim up to ``limit`` claimable runs (see the module's rules), obeying
        ``limits`` (:class:`QueueLimits`) atomically with the claim, so that the
        limits hold however many claimers race; returns :class:`Claims` to say
        when a rate limit frees its next start."""
        ...

    async def read(self, run_id: str, *, log_from: int = 0) -> Snapshot | None: ...

    async def append(
        self,
        run_id: str,
        *,
        token: int,
        expected_len: int,
        records: Sequence[bytes],
        update: RunUpdate | None = None,
        now: float,
    ) -> int:
        """Returns the new log length."""
        ...

    async def rewrite_log(
        self,
        run_id: str,
        *,
        token: int,
        expected_len: int,
        records: Sequence[bytes],
        now: float,
    ) -> int:
        """Replace the run's whole log with ``records`` (compaction), under the same
        fence as ``append``: iff ``token == lease_token`` and ``expected_len ==
        log_len``, else LeaseLost (RunNotFound for an unknown run). Atomic: a reader
        sees the old log or the new one. The run record, inbox and lease are left
        alone. Returns the new log length (``len(records)``)."""
        ...

    async def renew(
        self, leases: Mapping[str, int], *, lease_seconds: float, now: float
    ) -> set[str]:
        """Extend every lease in ``leases`` (run id -> token) to ``now + lease_seconds``,
        in one round trip where the store allows (a worker renews all it holds at
        once, so renewals never queue behind each other). Returns the run ids whose
        token was still current; the others are lost and left unchanged."""
        ...

    async def release(
        self,
        run_id: str,
        *,
        token: int,
        due_at: float | None,
        status: RunStatus,
        now: float,
    ) -> bool:
        """Drop the lease with a status (SUSPENDED or PENDING) and next due time.
        False if the token is no longer current (nothing changed)."""
        ...

    async def deliver(self, run_id: str, data: bytes, *, now: float) -> int:
        """Add an inbox item; returns its id."""
        ...

    async def request_cancel(self, run_id: str, *, now: float, revert: bool = False) -> None:
        """Mark for cancellation and make due. Unknown run: RunNotFound; terminal: no-op.
        ``revert``: also set ``revert_requested`` (never cleared by a later plain cancel)."""
        ...

    async def reopen(
        self, run_id: str, *, status: RunStatus, expected_len: int, keep_len: int, now: float
    ) -> bool:
        """Return an ended run to PENDING (``handle.resume()``), iff it still has
        ``status`` and a log of ``expected_len`` records: keep the first ``keep_len``
        records, clear ``ended_at``, ``result``, ``error``, ``error_type``, the lease
        and the cancel flags, and make it due now (the lease token stays). False if
        the run moved on (nothing changed); RunNotFound for an unknown run."""
        ...

    async def get_run(self, run_id: str) -> RunRecord | None: ...

    async def list_runs(self, query: RunQuery = ALL_RUNS) -> list[RunRecord]:
        """The runs matching ``query``, newest first (see :class:`RunQuery`)."""
        ...

    async def register_worker(self, info: WorkerRecord, *, now: float) -> None:
        """Insert or replace the worker's registry entry, its ``last_beat`` = ``now``."""
        ...

    async def beat_worker(self, worker_id: str, *, now: float) -> bool:
        """Set the entry's ``last_beat`` to ``now``; False if there is no entry (it was
        removed, or dropped once it aged past its lease): the worker registers again."""
        ...

    async def remove_worker(self, worker_id: str) -> None:
        """Drop the entry (a worker stopping cleanly). Unknown id: no-op."""
        ...

    async def list_workers(self, *, now: float) -> list[WorkerRecord]:
        """The live entries (``last_beat + lease_seconds > now``) by worker id. A store
        may delete the entries that aged out while it lists."""
        ...

    def subscribe(self) -> AsyncIterator[str]:
        """Hints that something changed: yields run ids ("" = unspecified).

        The first item is always ``""``, yielded once the subscription is
        established: every change made after that point is hinted to this
        subscriber. A subscriber therefore takes its first look at the store
        (a claim, a read) only after that first item, so no change can fall
        in a window between its look and its subscription. After a dropped
        connection is re-established, ``""`` is yielded again (hints may have
        been lost meanwhile). A store with no notification channel across
        processes yields ``""`` and then hints only for changes made through
        this process; its ``poll_interval`` covers the rest.
        """
        ...

    @property
    def poll_interval(self) -> float | None:
        """Fallback polling period for work made by other processes; None = never
        needed (every change is signalled through ``subscribe``)."""
        ...


@runtime_checkable
class JoinsTransactions(Protocol):
    """A capability some stores declare: creating a run inside the caller's own
    open transaction, so that the run exists iff that transaction commits
    (``Conductor.start(..., connection=...)``). PostgreSQL has it."""

    async def create_run_in(self, new: NewRun, connection: Any) -> bool:
        """``create_run`` through ``connection`` (a driver connection of the caller's)."""
        ...


@dataclass(kw_only=True, slots=True)
class Append:
    """One run's append, as :meth:`Backend.append` takes it, for a batch. (Not
    frozen, as one is made per append and a frozen one costs more to make; nothing
    changes it once made.)"""

    run_id: str
    token: int
    expected_len: int
    records: Sequence[bytes]
    update: RunUpdate | None = None
    now: float


@runtime_checkable
class AppendsInBatches(Protocol):
    """A capability: committing the appends of several runs together (group
    commit: one transaction on SQLite and PostgreSQL, one round trip on Redis).

    Each append is fenced on its own, exactly as :meth:`Backend.append`: one
    whose lease or length is stale changes nothing and gets its error in the
    result, and the others still commit. An error raised instead of returned
    means the batch as a whole failed (nothing of it is known to be durable)."""

    async def append_batch(self, appends: Sequence[Append]) -> list[int | Exception]:
        """Per append, in order: the log's new length, or why it was refused
        (RunNotFound, LeaseLost, a "log moved" BackendError)."""
        ...


RunCounts = dict[tuple[str, RunStatus], int]  # (workflow, status) -> runs


@runtime_checkable
class CountsRuns(Protocol):
    """A capability: counting runs by workflow and status in the store itself (a
    GROUP BY over an index, counters kept with each status change), so the count
    never pages every run through the client. Every store of this package has it;
    ``Journal.counts`` pages through ``list_runs`` for a store without it."""

    async def count_runs(self) -> RunCounts:
        """How many runs each (workflow, status) pair has right now; pairs with no
        run may be left out. A run is counted once, in its current status."""
        ...


@runtime_checkable
class PagesLog(Protocol):
    """A capability: reading a slice of a run's log, so a page of a long run's
    history costs the records it shows, not the whole log. Every store of this
    package has it; for a store without it the journal reads from ``start`` on."""

    async def read_log_page(
        self, run_id: str, *, start: int, stop: int
    ) -> tuple[RunRecord, list[bytes]] | None:
        """The run and its log records at positions ``start <= pos < stop`` (fewer
        past the log's end), in one read; None for an unknown run."""
        ...


@runtime_checkable
class KnowsNextDue(Protocol):
    """A capability of stores whose hints reach every process (PostgreSQL, Redis):
    telling an idle worker when the next run it could claim becomes claimable, so
    it sleeps until then (or a hint) instead of polling every ``poll_interval``."""

    async def next_due(self, *, queue: str, workflows: Collection[str], now: float) -> float | None:
        """The earliest time a run of ``workflows`` on ``queue`` becomes claimable:
        over the runs that are not terminal and have a due time, the later of
        that due time and their lease's expiry (at or before ``now``: claimable
        already). None when no such run waits for a time (only hints can bring
        work then)."""
        ...


@runtime_checkable
class Migrates(Protocol):
    """A capability of stores with a versioned schema (SQLite, PostgreSQL)."""

    async def migrate(self) -> int:
        """Apply pending schema migrations (idempotent); returns the schema version."""
        ...
