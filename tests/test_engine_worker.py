"""The decode-engine thread (inference/engine_worker.py) on a tiny random model, its thread started for real: a job
whose client leaves at any moment frees its slot exactly once and gets exactly one final event, and a shutdown
ends every job with an error event at once, even in the middle of a step.

References: the engine's own slot table (`DecodeEngine.free_slots`), the worker's Prometheus counters, and the
events each job receives, counted.
"""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from decoding import DecodeEngine, SamplingParams
from gpt_model import GPTModel
from inference.engine_worker import SHUTTING_DOWN, EngineWorker, Job
from inference.server_metrics import Metrics

SLOTS, JOBS, LEAVING = 2, 6, 2  # the first LEAVING jobs' clients leave; the others must all be served


class HookedEngine(DecodeEngine):
    """A DecodeEngine that calls `on_step(outputs)` after each step and `on_prefill(n)` before each prefill, in the
    engine thread: where a client's departure races the engine."""

    on_step = staticmethod(lambda outputs: None)
    on_prefill = staticmethod(lambda n: None)

    def step(self):
        outputs = super().step()
        self.on_step(outputs)
        return outputs

    def add_many(self, prompts, params=SamplingParams(), generator=None):
        self.on_prefill(len(prompts))
        return super().add_many(prompts, params, generator)


class GaugeSpy:
    """A gauge that calls `hook()` after each set() in the engine thread (the worker sets the queue depth right after
    taking jobs out of the queue, before their prefill)."""

    def __init__(self, gauge, hook) -> None:
        self.gauge, self.hook = gauge, hook

    def set(self, value: float) -> None:
        self.gauge.set(value)
        if threading.current_thread().name == "decode-engine":
            self.hook()


@pytest.fixture()
def model(tiny_config, one_thread):
    torch.manual_seed(0)
    return GPTModel(tiny_config).eval()


def finished(metrics: Metrics) -> dict[str, float]:
    """gpt_sequences_finished_total by reason (the reasons counted at least once)."""
    return {s.labels["reason"]: s.value for m in metrics.registry.collect() if m.name == "gpt_sequences_finished"
            for s in m.samples if s.name.endswith("_total") and s.value}


def leave(when: str, engine: HookedEngine, worker: EngineWorker, metrics: Metrics, jobs: list[Job]) -> None:
    """Arrange for the first LEAVING jobs' clients to leave at moment ``when`` (worker.cancel, as the server does)."""
    leaving, left = jobs[:LEAVING], set()

    def go(candidates) -> None:
        for job in candidates:
            if job not in left:
                left.add(job)
                worker.cancel(job)

    if when == "queued":
        go(leaving)
    elif when == "taken from the queue":  # out of the queue, its prefill not begun
        popped = lambda: worker.queue_depth <= JOBS - LEAVING  # noqa: E731  (the leaving ones are out)
        metrics.queue_depth = GaugeSpy(metrics.queue_depth, lambda: go(leaving if popped() else []))
    elif when == "in its prefill":
        engine.on_prefill = lambda n: go(leaving)
    elif when == "as it finishes":  # the engine has freed its slot, its "done" not yet routed
        engine.on_step = lambda outputs: go(j for j in leaving for o in outputs
                                            if o.finished and j.sequence is o.request)


def read_events(jobs: list[Job], received: list[list[tuple]]) -> None:
    """Append the events each job has received so far."""
    for job, got in zip(jobs, received):
        while not job.events.empty():
            got.append(job.events.get_nowait())


async def events_until_idle(worker: EngineWorker, jobs: list[Job]) -> list[list[tuple]]:
    """Every event of every job, read until all jobs have a final event and the worker is idle (then stopped)."""
    received: list[list[tuple]] = [[] for _ in jobs]
    deadline = time.time() + 30
    while not (all(any(e[0] in ("done", "error") for e in got) for got in received)
               and worker.active == 0 and worker.queue_depth == 0):
        assert time.time() < deadline, f"not all jobs ended: {received}"
        await asyncio.sleep(0.01)
        read_events(jobs, received)
    await asyncio.get_running_loop().run_in_executor(None, worker.stop)
    await asyncio.sleep(0.05)  # anything posted late would arrive now
    read_events(jobs, received)
    return received


@pytest.mark.parametrize("when", ["queued", "taken from the queue", "in its prefill", "as it finishes"])
def test_a_leaving_client_frees_its_slot_once_and_every_job_gets_one_final_event(model, tiny_tokenizer, when):
    engine, metrics = HookedEngine(model, tiny_tokenizer, n_slots=SLOTS), Metrics()
    worker = EngineWorker(engine, metrics, max_queue=JOBS, device=torch.device("cpu"), dtype=torch.float32,
                          num_threads=1)

    async def scenario() -> list[list[tuple]]:
        loop = asyncio.get_running_loop()
        jobs = [Job([tiny_tokenizer.bos_token_id, 65 + i], SamplingParams(max_new_tokens=3, do_sample=False), loop)
                for i in range(JOBS)]
        worker.submit_all(jobs)  # before the thread starts: every job waits, fewer slots than jobs
        leave(when, engine, worker, metrics, jobs)
        worker.start()
        return await events_until_idle(worker, jobs)

    received = asyncio.run(scenario())
    finals = [[e for e in got if e[0] in ("done", "error")] for got in received]
    assert all(len(f) == 1 for f in finals), finals  # exactly one final event each
    assert [f[0] for f in finals[LEAVING:]] == [("done", "length")] * (JOBS - LEAVING), finals  # no "0 free slots"
    assert all(f[0][0] == "done" for f in finals[:LEAVING]), finals
    assert sum(finished(metrics).values()) == JOBS, finished(metrics)  # each counted once
    assert engine.free_slots == list(range(SLOTS)) and not engine.has_work  # every slot back, none twice


def test_shut_down_ends_every_job_at_once_with_an_error_even_mid_step(model, tiny_tokenizer):
    engine, metrics = HookedEngine(model, tiny_tokenizer, n_slots=SLOTS), Metrics()
    worker = EngineWorker(engine, metrics, max_queue=JOBS, device=torch.device("cpu"), dtype=torch.float32,
                          num_threads=1)
    in_step, release = threading.Event(), threading.Event()

    def slow_step(outputs) -> None:  # the second step blocks until the test lets it go
        if engine.active and engine.active[0].output_ids and len(engine.active[0].output_ids) >= 2:
            in_step.set()
            release.wait(10)

    engine.on_step = slow_step

    async def scenario() -> list[list[tuple]]:
        loop = asyncio.get_running_loop()
        jobs = [Job([tiny_tokenizer.bos_token_id, 65 + i], SamplingParams(max_new_tokens=50, do_sample=False), loop)
                for i in range(JOBS)]
        worker.submit_all(jobs)
        worker.start()
        assert await loop.run_in_executor(None, in_step.wait, 10), "the engine never reached its second step"
        worker.shut_down()
        finals: list[tuple] = []
        for job in jobs:  # all of them while the step still blocks: no job waits for the engine thread
            while (event := await asyncio.wait_for(job.events.get(), 5))[0] == "text":
                pass
            finals.append(event)
        release.set()
        await loop.run_in_executor(None, worker.stop)
        await asyncio.sleep(0.05)
        late: list[list[tuple]] = [[] for _ in jobs]
        read_events(jobs, late)
        return [finals, [e for got in late for e in got]]

    finals, late = asyncio.run(scenario())
    assert finals == [("error", 503, SHUTTING_DOWN)] * JOBS  # a cut answer is never reported as finished
    assert [e for e in late if e[0] != "text"] == []  # and nothing final after it
    assert finished(metrics) == {"error": JOBS}
    assert engine.free_slots == list(range(SLOTS)) and not worker.alive


def test_the_engine_warms_up_on_its_own_thread_before_start_returns(model, tiny_tokenizer):
    """A compiled graph is compiled for a thread count (and autocast state): warmed up elsewhere, every graph would
    compile again at the first request. The warm-up runs on the engine thread, with its threads, and start() waits."""
    seen = []

    class Warming(DecodeEngine):
        def warm_up(self):
            time.sleep(0.2)  # start() must not return before this ends
            seen.append((threading.current_thread().name, torch.get_num_threads()))
            return []

    threads = torch.get_num_threads()
    worker = EngineWorker(Warming(model, tiny_tokenizer, n_slots=1), Metrics(), max_queue=1,
                          device=torch.device("cpu"), dtype=torch.float32, num_threads=1)
    try:
        worker.start()
        assert seen == [("decode-engine", 1)] and worker.alive
    finally:
        worker.stop()
        torch.set_num_threads(threads)  # torch's thread count is the process's: the engine thread set it


def test_a_failed_warm_up_stops_the_engine_with_its_reason(model, tiny_tokenizer):
    class Failing(DecodeEngine):
        def warm_up(self):
            raise RuntimeError("no compiler")

    threads = torch.get_num_threads()
    worker = EngineWorker(Failing(model, tiny_tokenizer, n_slots=1), Metrics(), max_queue=1,
                          device=torch.device("cpu"), dtype=torch.float32, num_threads=1)
    worker.start()  # returns: the failure is reported, never a hang
    worker._thread.join(timeout=10)
    torch.set_num_threads(threads)
    assert not worker.alive and "no compiler" in worker.failure
