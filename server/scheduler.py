"""One worker thread that owns the engine and runs generations a token at a time.

Why a single worker stepping generators: two CPU cores are best spent on one forward pass at a
time, and stepping lets the scheduler (1) cancel between any two tokens, (2) let editor work
pre-empt HTTP batch work (lower `priority` number runs first), (3) share the engine fairly among
equal-priority jobs (round robin per token), (4) keep "latest wins" per document: submitting a
job with the `replace` key of a running one cancels the old one, and (5) never starve waiting work:
after `SHARE_EVERY` steps of better-priority jobs while others wait, one step goes to a waiting
job (round robin among them), so HTTP clients get at least one token per `SHARE_EVERY` editor
tokens however fast someone types (docs/protocol.md, "Sharing the model").

Callbacks run on the worker thread; protocol layers hop back to their own loop themselves.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from ..steering.engine import CompletionRequest, Engine
from ..steering.generate import CancelToken, Completion, Timings, TokenEvent

PRIORITY_EDITOR = 0  # the document the user types in
PRIORITY_BACKGROUND = 5  # other open documents (one job each, when the editor shows them)
PRIORITY_HTTP = 10
SHARE_EVERY = 4  # waiting lower-priority work gets >= 1 step per this many better-priority steps

OnToken = Callable[["Job", TokenEvent], None]
OnDone = Callable[["Job", Completion | None, BaseException | None], None]


@dataclass(eq=False)
class Job:
    request: CompletionRequest
    priority: int = PRIORITY_EDITOR
    replace: Hashable | None = None  # at most one job per key: a new one cancels the old
    on_token: OnToken | None = None
    on_done: OnDone | None = None
    cancel: CancelToken = field(default_factory=CancelToken)
    seq: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    result: Completion | None = None
    error: BaseException | None = None

    def wait(self, timeout: float | None = None) -> Completion | None:
        self.done.wait(timeout)
        if self.error is not None:
            raise self.error
        return self.result


@dataclass
class SchedulerStats:
    submitted: int = 0
    finished: int = 0
    cancelled: int = 0
    failed: int = 0
    superseded: int = 0


def supersede(by_key: dict[Hashable, Job], job: Job, stats: SchedulerStats) -> None:
    """Cancel the job that `job` replaces (same replace key: the same document and plan, one edit
    older) and make `job` the one for that key. Callers hold their lock."""
    if job.replace is not None:
        old = by_key.get(job.replace)
        if old is not None:
            old.cancel.cancel()
            stats.superseded += 1
        by_key[job.replace] = job


class Scheduler:
    """Runs `Job`s on one engine, one forward pass at a time."""

    def __init__(self, engine: Engine | None = None):
        self.engine = engine
        self.stats = SchedulerStats()
        self._jobs: list[tuple[Job, object]] = []  # (job, generator or None before start)
        self._by_key: dict[Hashable, Job] = {}
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._rr = 0
        self._rr_low = 0
        self._since_share = 0
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="tinymorph-engine", daemon=True)
        self._thread.start()

    # -- public -----------------------------------------------------------------------------
    def set_engine(self, engine: Engine) -> None:
        with self._cv:
            self.engine = engine
            self._cv.notify_all()

    def submit(self, job: Job) -> Job:
        if job.request.queued_at is None:
            job.request.queued_at = time.perf_counter()
        with self._cv:
            job.seq = next(self._seq)
            supersede(self._by_key, job, self.stats)
            self._jobs.append((job, None))
            self.stats.submitted += 1
            self._cv.notify_all()
        return job

    def cancel_key(self, key: Hashable) -> None:
        with self._cv:
            job = self._by_key.get(key)
            if job is not None:
                job.cancel.cancel()
                self._cv.notify_all()

    def queue_depth(self) -> int:
        with self._cv:
            return len(self._jobs)

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            for job, _ in self._jobs:
                job.cancel.cancel()
            self._cv.notify_all()
        self._thread.join(timeout=5)

    # -- worker -----------------------------------------------------------------------------
    def _pick(self) -> int:
        """Index of the next job to step: best priority, round robin among equals, except that every
        `SHARE_EVERY`-th step while worse-priority jobs wait goes to one of them (round robin)."""
        best = min(job.priority for job, _ in self._jobs)
        waiting = [i for i, (job, _) in enumerate(self._jobs) if job.priority > best]
        if waiting and self._since_share >= SHARE_EVERY:
            self._since_share = 0
            self._rr_low = (self._rr_low + 1) % len(waiting)
            return waiting[self._rr_low]
        self._since_share = self._since_share + 1 if waiting else 0
        candidates = [i for i, (job, _) in enumerate(self._jobs) if job.priority == best]
        self._rr = (self._rr + 1) % len(candidates)
        return candidates[self._rr]

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopped and (not self._jobs or self.engine is None):
                    self._cv.wait()
                if self._stopped:
                    return
                index = self._pick()
                job, gen = self._jobs[index]
            if job.cancel.cancelled and gen is None:
                self._finish(job, _cancelled(job), None)
                continue
            try:
                if gen is None:
                    gen = self.engine.stream(job.request, job.cancel)
                    with self._cv:
                        self._jobs[self._jobs.index((job, None))] = (job, gen)
                event = next(gen)
            except StopIteration as stop:
                self._finish(job, stop.value, None)
                continue
            except Exception as exc:  # noqa: BLE001 - reported to the job's owner, worker survives
                self._finish(job, None, exc)
                continue
            if job.on_token is not None:
                _safe(job.on_token, job, event)

    def _finish(self, job: Job, result: Completion | None, error: BaseException | None) -> None:
        with self._cv:
            self._jobs = [(j, g) for j, g in self._jobs if j is not job]
            if job.replace is not None and self._by_key.get(job.replace) is job:
                del self._by_key[job.replace]
            if error is not None:
                self.stats.failed += 1
            elif result is not None and result.stop_reason == "cancelled":
                self.stats.cancelled += 1
            else:
                self.stats.finished += 1
        job.result, job.error = result, error
        job.done.set()
        if job.on_done is not None:
            _safe(job.on_done, job, result, error)


def _cancelled(job: Job) -> Completion:
    timings = Timings()
    if job.request.queued_at is not None:
        timings.queue_ms = (time.perf_counter() - job.request.queued_at) * 1000
    return Completion("", [], "cancelled", timings)


def _safe(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - a broken callback must not kill the engine thread
        import logging

        logging.getLogger(__name__).exception("scheduler callback failed")
