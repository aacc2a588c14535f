"""The decode-engine thread: `EngineWorker` runs `DecodeEngine`'s loop in a thread of its own, admitting queued
`Job`s into free slots (continuous batching), stepping the batch and routing each text piece back to the event loop
of the request it belongs to (one wake-up per loop per step); a full queue raises `QueueFull` (429). A finished,
cancelled or timed-out sequence leaves its slot at once, and frees it once: admission counts only the engine's own
free slots, after the cancelled sequences have left them. Every job gets exactly one final event ("done" or
"error"), also when the server shuts down (`shut_down`: an error event at once, even mid-step). The thread warms the
engine up first (a compiled step's graphs, compiled for this thread's thread count), and `start()` waits for it.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import torch

from decoding import DecodeEngine, DecodingError, Request as EngineRequest, SamplingParams, StepOutput
from devices import autocast_context
from inference.server_metrics import Metrics

log = logging.getLogger(__name__)
SHUTTING_DOWN = "the server is shutting down: this answer was cut short; send the request again"


class QueueFull(Exception):
    """No room in the waiting queue (429)."""


@dataclass(eq=False)
class Job:
    """One request on its way through the engine; events go to `events` on the request's event loop."""

    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    arrival: float = field(default_factory=time.perf_counter)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    sequence: EngineRequest | None = None
    first_token_at: float | None = None
    finish_reason: str | None = None
    closed: bool = False  # its one final event ("done" or "error") has gone out; set under the worker's lock
    observed: bool = True  # its TTFT and latency go to the histograms (not for best_of candidates, timed as one)
    logprobs: list[tuple[int, float, tuple]] = field(default_factory=list)  # (id, log-prob, top) per token, if asked
    logprob_marks: deque = field(default_factory=deque)  # per text event: how many logprobs its text covers

    def post(self, event: tuple) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    @property
    def num_tokens(self) -> int:
        """Tokens generated, the closing </s> not counted."""
        if self.sequence is None:
            return 0
        ids = self.sequence.output_ids
        return len(ids) - (self.finish_reason == "eos")


def engine_threads() -> int:
    """The engine's default CPU threads: torch's default (every core). Measured (bench_peers, 124M INT8 server on
    2 cores, ``ours_int8_t1`` against ``ours_int8_t2``): two engine threads stream more than one at 1, 8 and 32
    users; the event loop's share of a core is small next to the decode step's."""
    return torch.get_num_threads()


class EngineWorker:
    """Runs the decode loop in its own thread: admits queued jobs into free slots, steps, routes pieces back."""

    def __init__(self, engine: DecodeEngine, metrics: Metrics, max_queue: int, device: torch.device,
                 dtype: torch.dtype, num_threads: int = 0) -> None:
        self.engine, self.metrics, self.max_queue = engine, metrics, max_queue
        self.device, self.dtype, self.num_threads = device, dtype, num_threads
        self._cond = threading.Condition()  # reentrant: _close takes it inside cancel and shut_down
        self._waiting: deque[Job] = deque()
        self._to_cancel: list[Job] = []  # closed jobs whose slot (if they hold one) the engine thread frees
        self._jobs: dict[EngineRequest, Job] = {}  # the jobs holding a slot
        self._live: set[Job] = set()  # every job without its final event yet (what shut_down ends)
        self._running = True
        self.failure: str | None = None  # why the engine thread stopped on an error it could not handle
        self._thread = threading.Thread(target=self._run, name="decode-engine", daemon=True)
        self._warmed = threading.Event()  # the engine thread finished (or failed) its warm-up

    def start(self) -> None:
        """Start the engine thread; returns once its compiled graphs (compile "on") are ready."""
        self._thread.start()
        self._warmed.wait()

    @property
    def alive(self) -> bool:
        """Whether the engine thread runs and can serve (/health is 503 otherwise)."""
        return self._thread.is_alive() and self.failure is None

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._jobs)

    def submit(self, job: Job) -> None:
        self.submit_all([job])

    def submit_all(self, jobs: Sequence[Job]) -> None:
        """Queue jobs side by side (a request's best_of candidates, so they batch together): all of them or none."""
        with self._cond:
            if not self._running:
                raise QueueFull(self.failure or "the server is shutting down")
            free = max(0, self.engine.n_slots - len(self._jobs))  # a job waits here briefly even with a free slot
            if len(self._waiting) + len(jobs) > self.max_queue + free:
                needs = f" and this request needs {len(jobs)} places (best_of)" if len(jobs) > 1 else ""
                raise QueueFull(f"{len(self._waiting)} requests are already waiting{needs} "
                                f"(--max_queue {self.max_queue})")
            self._waiting.extend(jobs)
            self._live.update(jobs)
            self.metrics.queue_depth.set(len(self._waiting))
            self._cond.notify()

    def cancel(self, job: Job, reason: str = "aborted") -> None:
        """Take a job out (client gone, timeout): its final event now, its slot freed by the engine thread at its
        next iteration (a no-op for a job that already has its final event, so a slot is never freed twice)."""
        with self._cond:
            if not self._close(job, reason, ("done", reason)):
                return
            if job in self._waiting:  # it never had a slot
                self._waiting.remove(job)
                self.metrics.queue_depth.set(len(self._waiting))
            else:  # in a slot, or on its way into one (admission skips closed jobs)
                self._to_cancel.append(job)
                self._cond.notify()

    def shut_down(self, message: str = SHUTTING_DOWN) -> None:
        """Refuse new jobs and end every job left with an error event (503) now, even while a step runs; the engine
        thread then frees their slots and ends. Called when the graceful shutdown's time is up, and by stop()."""
        with self._cond:
            self._running = False
            for job in list(self._live):
                self._close(job, "error", ("error", 503, message))
            self._cond.notify()

    def stop(self, timeout: float = 5.0) -> None:
        """End every job left (shut_down) and the thread."""
        self.shut_down()
        self._thread.join(timeout)

    def _close(self, job: Job, reason: str, event: tuple, outbox: list | None = None) -> bool:
        """Give a job its one final event (`("done", reason)` or `("error", status, message)`) and count it; False,
        doing nothing, when it already has one (it finished, failed, was cancelled or shut down before)."""
        with self._cond:
            if job.closed:
                return False
            job.closed, job.finish_reason = True, reason
            self._live.discard(job)
        self.metrics.finished.labels(reason).inc()
        if outbox is None:
            job.post(event)
        else:
            outbox.append((job, event))
        return True

    def _run(self) -> None:
        torch.set_num_threads(self.num_threads or engine_threads())
        try:
            with autocast_context(self.device, self.dtype):  # autocast state is per thread: enter it here
                try:  # here, not in the loading thread: a graph is compiled for a thread count and autocast state
                    self.engine.warm_up()
                finally:
                    self._warmed.set()
                while self._iterate():
                    pass
        except Exception as err:  # a bug or an error no request owns: say so, fail what is left, never hang
            log.exception("the decode engine stopped")
            with self._cond:
                self.failure = f"the decode engine stopped: {type(err).__name__}: {err}"
                self._running = False
        with self._cond:
            held, left = list(self._jobs), list(self._live)
            self._waiting.clear()
            self._jobs.clear()
        for sequence in held:
            self.engine.abort(sequence)
        for job in left:  # none after shut_down; the jobs a failure left
            self._close(job, "error", ("error", 503, self.failure or SHUTTING_DOWN))
        self.metrics.active.set(0)
        self.metrics.queue_depth.set(0)

    def _iterate(self) -> bool:
        with self._cond:
            while self._running and not self._waiting and not self._to_cancel and not self.engine.has_work:
                self._cond.wait()
            if not self._running:
                return False
            cancels, self._to_cancel = self._to_cancel, []
        for job in cancels:  # first: admission below counts the slots they free, once, from the engine itself
            if job.sequence is not None and self._jobs.pop(job.sequence, None) is job:
                self.engine.abort(job.sequence)
        with self._cond:
            n_admit = min(len(self._waiting), len(self.engine.free_slots))
            admitted = [self._waiting.popleft() for _ in range(n_admit)]
            self.metrics.queue_depth.set(len(self._waiting))
        self._admit([job for job in admitted if not job.closed])  # a job cancelled meanwhile never takes a slot
        if self.engine.has_work:
            self._step()
        self.metrics.active.set(len(self._jobs))
        return True

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill the new jobs together; if that fails, one by one, so a bad request fails alone."""
        if not jobs:
            return
        try:
            sequences = self.engine.add_many([j.prompt_ids for j in jobs], [j.params for j in jobs])
        except Exception:  # noqa: BLE001  (any error of the batch: retry one by one, so a bad request fails alone)
            sequences = []
            for job in jobs:
                try:
                    sequences.append(self.engine.add(job.prompt_ids, job.params))
                except Exception as err:  # noqa: BLE001  (this request's error is its answer)
                    log.warning("request failed at prefill: %s", err)
                    sequences.append(None)
                    self._close(job, "error", ("error", 422 if isinstance(err, DecodingError) else 500, str(err)))
        for job, sequence in zip(jobs, sequences):
            if sequence is not None:
                job.sequence = sequence
                self._jobs[sequence] = job  # closed meanwhile: cancel() queued it, the next iteration frees it
                self.metrics.prompt_tokens.inc(len(job.prompt_ids))

    def _step(self) -> None:
        batch = len(self.engine.active)
        try:
            outputs = self.engine.step()
        except Exception as err:  # noqa: BLE001  (device error, out of memory, a bug: the batch fails)
            log.error("decode step failed, failing %d sequences: %s", len(self._jobs), err)
            for sequence, job in list(self._jobs.items()):
                self.engine.abort(sequence)
                self._close(job, "error", ("error", 503, f"the decode step failed: {err}"))
            self._jobs.clear()
            return
        if batch:
            self.metrics.batch_size.observe(batch)
        outbox: list[tuple[Job, tuple]] = []
        for out in outputs:
            self._route(out, outbox)
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for job, event in outbox:
            by_loop.setdefault(job.loop, []).append((job, event))
        for loop, items in by_loop.items():  # one wake-up of each event loop per step, not one per sequence
            loop.call_soon_threadsafe(_deliver, items)

    def _route(self, out: StepOutput, outbox: list) -> None:
        job = self._jobs.get(out.request)
        if job is None or job.closed:  # cancelled or shut down meanwhile: its final event has gone out
            return
        if job.first_token_at is None:
            job.first_token_at = time.perf_counter()
            if job.observed:
                self.metrics.ttft.observe(job.first_token_at - job.arrival)
        if out.logprob is not None:  # read by the event loop once this step's events arrive
            job.logprobs.append((out.token_id, out.logprob, out.top_logprobs))
        if out.text:
            if out.logprob is not None:
                job.logprob_marks.append(len(job.logprobs))
            outbox.append((job, ("text", out.text)))
        if out.finished:
            del self._jobs[out.request]
            self.metrics.generated_tokens.inc(len(out.request.output_ids))
            self._close(job, out.request.finish_reason, ("done", out.request.finish_reason), outbox)


def _deliver(items: list[tuple[Job, tuple]]) -> None:
    """On a request's event loop: hand one step's events to their jobs."""
    for job, event in items:
        job.events.put_nowait(event)
