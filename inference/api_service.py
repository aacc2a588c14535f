"""HTTP serving on the decode engine: `/generate`, an OpenAI-compatible API, streaming, metrics and limits.

    uvicorn inference.api_service:app --host 127.0.0.1 --port 8000      # settings from GPT_* environment variables
    python -m inference.api_service --model_path models/sft/sft_best.pth --max_batch_size 32   # the same, as flags

One process holds one model and one `DecodeEngine`. A dedicated engine thread runs the decode loop: requests wait
in a bounded queue, are prefilled into free slots and join the running batch at the next step (continuous
batching); a finished, cancelled or timed-out sequence leaves at once. The event loop only parses requests,
tokenizes and forwards text pieces, so `/health` and `/metrics` answer promptly under full load. A best_of request
samples its candidates in the same batch and scores them in a scorer thread (the reward model, else the mean token
log-prob under the served model), off the event loop too.
"""
import argparse
import asyncio
import hmac
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator, Literal, Sequence

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException

import checkpoints
from checkpoints import checkpoint_metadata
from cli import UsageError, nonnegative_float, nonnegative_int, positive_float, positive_int, run_cli
from decoding import (DecodeEngine, DecodingError, Request as EngineRequest, SamplingParams, StepOutput,
                      candidate_seeds, mean_token_logprobs, reward_scores)
from devices import autocast_context, resolve_device, resolve_dtype
from gpt_model import GPTModel
from model_heads import GPTRewardModel
from prompts import encode_prompt, render_chat
from quantization import is_quantized

log = logging.getLogger("inference.api_service")
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = ("models/sft/sft_best_int8.pth", "models/sft/sft_best.pth")
FALLBACK_MODEL = "models/pretrain/pretrain_best.pth"
MAX_STOP, MAX_STOP_LEN = 4, 64
ENDPOINTS = ("/health", "/generate", "/v1/completions", "/v1/chat/completions", "/v1/models", "/metrics",
             "/docs", "/openapi.json")

# ----------------------------------------------------------------------------- settings


class SettingsParser(argparse.ArgumentParser):
    """argparse whose errors raise UsageError (one line through cli.run_cli, a clear message under uvicorn)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see python -m inference.api_service --help)")


# (flag, environment variable, default as text, argparse type, help). Every flag's default comes from its
# variable, so `uvicorn ...:app` (environment only) and `python -m inference.api_service` read the same settings.
SETTINGS = [
    ("--model_path", "GPT_MODEL_PATH", "", str, "checkpoint (.pth, float or INT8); default: "
     "models/sft/sft_best_int8.pth, else models/sft/sft_best.pth, else models/pretrain/pretrain_best.pth (warning)"),
    ("--tokenizer_dir", "GPT_TOKENIZER_DIR", "", str, "tokenizer folder (default: <checkpoint folder>/tokenizer)"),
    ("--host", "GPT_HOST", "127.0.0.1", str, "address to bind (0.0.0.0 to accept other machines, as in Docker)"),
    ("--port", "GPT_PORT", "8000", positive_int, "TCP port"),
    ("--device", "GPT_DEVICE", "auto", str, "auto (cuda, else mps, else cpu), cpu, cuda, cuda:1, mps"),
    ("--dtype", "GPT_DTYPE", "auto", str, "compute precision: auto (bf16/fp16 on CUDA, fp32 elsewhere), float32, "
     "bfloat16, float16 (autocast; weights stay as loaded)"),
    ("--quantize", "GPT_QUANTIZE", "none", str, "none, or int8: quantize a float checkpoint's weights at startup "
     "(INT8 checkpoints load as INT8 either way)"),
    ("--max_batch_size", "GPT_MAX_BATCH_SIZE", "32", positive_int, "sequences decoded together (KV-cache slots)"),
    ("--max_queue", "GPT_MAX_QUEUE", "128", nonnegative_int, "requests waiting for a slot; beyond it: 429"),
    ("--max_prompt_tokens", "GPT_MAX_PROMPT_TOKENS", "0", nonnegative_int,
     "longest prompt accepted, in tokens (0 = the model's context minus one)"),
    ("--max_new_tokens", "GPT_MAX_NEW_TOKENS", "512", positive_int,
     "largest max_gen_len / max_tokens a request may ask"),
    ("--request_timeout", "GPT_REQUEST_TIMEOUT", "120", positive_float,
     "seconds a request may take, queue included; beyond it: 504 and its slot is freed"),
    ("--api_key", "GPT_API_KEY", "", str, "require `Authorization: Bearer KEY` on every route but /health "
     "(prefer the variable: a flag shows in the process list)"),
    ("--max_body_bytes", "GPT_MAX_BODY_BYTES", "1048576", positive_int, "largest request body; beyond it: 413"),
    ("--shutdown_timeout", "GPT_SHUTDOWN_TIMEOUT", "30", nonnegative_float,
     "on SIGTERM, seconds to let in-flight requests finish before cancelling them"),
    ("--threads", "GPT_THREADS", "0", nonnegative_int, "torch CPU threads (0 = torch's default)"),
    ("--reward_model", "GPT_REWARD_MODEL", "", str, "reward-model checkpoint that picks the best of a request's "
     "best_of samples (trained with the served model's tokenizer); unset: the highest mean token log-prob under the "
     "served model (OpenAI's rule)"),
    ("--max_best_of", "GPT_MAX_BEST_OF", "8", positive_int,
     "largest best_of a request may ask: samples generated (and tokens spent) for one answer"),
]


def build_parser(environ: dict[str, str] | None = None) -> SettingsParser:
    environ = os.environ if environ is None else environ
    parser = SettingsParser(prog="python -m inference.api_service",
                            description="Serve a GPTModel checkpoint over HTTP: /generate, an OpenAI-compatible API "
                                        "(/v1/completions, /v1/chat/completions, /v1/models), /health and /metrics. "
                                        "Each flag also reads the environment variable in brackets.")
    for flag, env, default, kind, help_text in SETTINGS:
        parser.add_argument(flag, type=kind, default=environ.get(env, default),
                            help=f"{help_text} [{env}, default: {default or 'unset'}]")
    parser.add_argument("--log_level", default=environ.get("GPT_LOG_LEVEL", "info"),
                        choices=["critical", "error", "warning", "info", "debug"],
                        help="server log level [GPT_LOG_LEVEL]")
    return parser


@dataclass(frozen=True)
class Settings:
    """The server's settings (flags or GPT_* environment variables); see SETTINGS for the meaning of each."""

    model_path: str = ""
    tokenizer_dir: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    dtype: str = "auto"
    quantize: str = "none"
    max_batch_size: int = 32
    max_queue: int = 128
    max_prompt_tokens: int = 0
    max_new_tokens: int = 512
    request_timeout: float = 120.0
    api_key: str = ""
    max_body_bytes: int = 1 << 20
    shutdown_timeout: float = 30.0
    threads: int = 0
    reward_model: str = ""
    max_best_of: int = 8
    log_level: str = "info"

    def __post_init__(self) -> None:
        if self.quantize not in ("none", "int8"):
            raise UsageError(f"--quantize must be none or int8, got {self.quantize!r}")

    def __repr__(self) -> str:  # the API key never reaches a log line
        shown = {k: ("***" if k == "api_key" and v else v) for k, v in vars(self).items()}
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> "Settings":
        return cls(**vars(build_parser(environ).parse_args(argv)))

    def resolved_model_path(self) -> Path:
        """The checkpoint to serve: the configured one, else the first default that exists."""
        if self.model_path:
            return Path(self.model_path)
        for candidate in DEFAULT_MODELS:
            if (ROOT / candidate).is_file():
                return ROOT / candidate
        if (ROOT / FALLBACK_MODEL).is_file():
            warnings.warn(f"no SFT model in models/sft/; serving the pretrained model {FALLBACK_MODEL}", stacklevel=2)
            return ROOT / FALLBACK_MODEL
        candidates = ", ".join(DEFAULT_MODELS + (FALLBACK_MODEL,))
        raise UsageError(f"no model to serve: none of {candidates} exists; train one (python pretrain_trainer.py) "
                         "or pass --model_path / GPT_MODEL_PATH")


# ----------------------------------------------------------------------------- metrics


class Metrics:
    """The server's Prometheus metrics, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gpt_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("gpt_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("gpt_generated_tokens", "tokens generated (every best_of sample)",
                                        registry=r)
        self.finished = Counter("gpt_sequences_finished", "sequences that left the engine, by reason "
                                "(eos, stop, length, aborted, timeout, error)", ["reason"], registry=r)
        self.ttft = Histogram("gpt_time_to_first_token_seconds", "arrival to first generated token", registry=r,
                              buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.latency = Histogram("gpt_request_latency_seconds", "arrival to last token", registry=r,
                                 buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
        self.batch_size = Histogram("gpt_batch_size", "sequences per decode step", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.queue_depth = Gauge("gpt_queue_depth", "requests waiting for a slot", registry=r)
        self.active = Gauge("gpt_active_sequences", "sequences in the running batch", registry=r)


# ----------------------------------------------------------------------------- the engine thread


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
    cancelled: bool = False
    observed: bool = True  # its TTFT and latency go to the histograms (not for best_of candidates, timed as one)

    def post(self, event: tuple) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    @property
    def num_tokens(self) -> int:
        """Tokens generated, the closing </s> not counted."""
        if self.sequence is None:
            return 0
        ids = self.sequence.output_ids
        return len(ids) - (self.finish_reason == "eos")


class EngineWorker:
    """Runs the decode loop in its own thread: admits queued jobs into free slots, steps, routes pieces back."""

    def __init__(self, engine: DecodeEngine, metrics: Metrics, max_queue: int, device: torch.device,
                 dtype: torch.dtype, threads: int = 0):
        self.engine, self.metrics, self.max_queue = engine, metrics, max_queue
        self.device, self.dtype, self.threads = device, dtype, threads
        self._cond = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._to_cancel: list[Job] = []
        self._jobs: dict[EngineRequest, Job] = {}
        self._running = True
        self._thread = threading.Thread(target=self._run, name="decode-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

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
                raise QueueFull("the server is shutting down")
            free = max(0, self.engine.n_slots - len(self._jobs))  # a job waits here briefly even with a free slot
            if len(self._waiting) + len(jobs) > self.max_queue + free:
                needs = f" and this request needs {len(jobs)} places (best_of)" if len(jobs) > 1 else ""
                raise QueueFull(f"{len(self._waiting)} requests are already waiting{needs} "
                                f"(--max_queue {self.max_queue})")
            self._waiting.extend(jobs)
            self.metrics.queue_depth.set(len(self._waiting))
            self._cond.notify()

    def cancel(self, job: Job, reason: str = "aborted") -> None:
        """Take a job out (client gone, timeout): from the queue at once, from its slot at the next step."""
        with self._cond:
            if job.finish_reason is not None or job.cancelled:
                return
            job.cancelled = True
            if job in self._waiting:
                self._waiting.remove(job)
                self.metrics.queue_depth.set(len(self._waiting))
                self._finish(job, reason)
            else:
                self._to_cancel.append(job)
                job.finish_reason = reason  # set now; the engine thread frees the slot
                self._cond.notify()

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel everything left and end the thread."""
        with self._cond:
            self._running = False
            self._cond.notify()
        self._thread.join(timeout)

    def _finish(self, job: Job, reason: str, outbox: list | None = None) -> None:
        job.finish_reason = reason
        self.metrics.finished.labels(reason).inc()
        if outbox is None:
            job.post(("done", reason))
        else:
            outbox.append((job, ("done", reason)))

    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        with autocast_context(self.device, self.dtype):  # autocast state is per thread: enter it here
            while self._iterate():
                pass
        with self._cond:
            leftovers = list(self._waiting) + list(self._jobs.values())
            self._waiting.clear()
        for job in leftovers:
            if job.sequence is not None:
                self.engine.abort(job.sequence)
            self._finish(job, "aborted")
        self._jobs.clear()
        self.metrics.active.set(0)
        self.metrics.queue_depth.set(0)

    def _iterate(self) -> bool:
        with self._cond:
            while self._running and not self._waiting and not self._to_cancel and not self.engine.has_work:
                self._cond.wait()
            if not self._running:
                return False
            cancels, self._to_cancel = self._to_cancel, []
            n_admit = min(len(self._waiting), len(self.engine.free_slots) + len(cancels))
            admitted = [self._waiting.popleft() for _ in range(n_admit)]
            self.metrics.queue_depth.set(len(self._waiting))
        for job in cancels:
            if job.sequence is not None:
                self.engine.abort(job.sequence)
                self._jobs.pop(job.sequence, None)
            self.metrics.finished.labels(job.finish_reason).inc()
            job.post(("done", job.finish_reason))
        self._admit([job for job in admitted if not job.cancelled])
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
        except (DecodingError, RuntimeError):
            sequences = []
            for job in jobs:
                try:
                    sequences.append(self.engine.add(job.prompt_ids, job.params))
                except (DecodingError, RuntimeError) as err:
                    log.warning("request failed at prefill: %s", err)
                    sequences.append(None)
                    self.metrics.finished.labels("error").inc()
                    job.finish_reason = "error"
                    job.post(("error", 500 if isinstance(err, RuntimeError) else 422, str(err)))
        for job, sequence in zip(jobs, sequences):
            if sequence is not None:
                job.sequence = sequence
                self._jobs[sequence] = job
                self.metrics.prompt_tokens.inc(len(job.prompt_ids))

    def _step(self) -> None:
        batch = len(self.engine.active)
        try:
            outputs = self.engine.step()
        except RuntimeError as err:  # a device error (e.g. out of memory) takes down the batch, not the server
            log.error("decode step failed, failing %d sequences: %s", len(self._jobs), err)
            for sequence, job in list(self._jobs.items()):
                self.engine.abort(sequence)
                self.metrics.finished.labels("error").inc()
                job.finish_reason = "error"
                job.post(("error", 503, f"the decode step failed: {err}"))
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
        if job is None or job.cancelled:  # cancelled meanwhile: the engine thread aborts it next
            return
        if job.first_token_at is None:
            job.first_token_at = time.perf_counter()
            if job.observed:
                self.metrics.ttft.observe(job.first_token_at - job.arrival)
        if out.text:
            outbox.append((job, ("text", out.text)))
        if out.finished:
            del self._jobs[out.request]
            self.metrics.generated_tokens.inc(len(out.request.output_ids))
            self._finish(job, out.request.finish_reason, outbox)


def _deliver(items: list[tuple[Job, tuple]]) -> None:
    for job, event in items:
        job.events.put_nowait(event)


# ----------------------------------------------------------------------------- the served model


@dataclass
class ServedModel:
    """What /health reports and the routes need: the model, tokenizer, engine thread and their description."""

    path: Path
    model: torch.nn.Module
    tokenizer: Any
    worker: EngineWorker
    template: str
    quantization: str
    parameters: int
    device: torch.device
    dtype: torch.dtype
    reward_path: Path | None = None
    reward_model: GPTRewardModel | None = None
    scorer: ThreadPoolExecutor = field(  # one thread scores best_of candidates: bounded memory, never the event loop
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="best-of-scorer"))

    @property
    def context(self) -> int:
        return self.model.config.max_seq_len

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def name(self) -> str:
        return self.path.stem


def load_served_model(settings: Settings, metrics: Metrics) -> ServedModel:
    """Load the checkpoint (INT8 or float, quantizing on request), build the engine and start its thread."""
    path = settings.resolved_model_path()
    tokenizer_dir = Path(settings.tokenizer_dir) if settings.tokenizer_dir else path.parent / "tokenizer"
    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    loaded = checkpoints.load(path, tokenizer_dir, device, quantize=settings.quantize, dtype=dtype, expect="lm")
    model, tokenizer, template = loaded.model, loaded.tokenizer, loaded.template
    reward_path = Path(settings.reward_model) if settings.reward_model else None
    reward = load_reward_model(reward_path, tokenizer, tokenizer_dir, device) if reward_path else None
    with torch.device("meta"):
        parameters = GPTModel(model.config).num_parameters()
    engine = DecodeEngine(model, tokenizer, n_slots=settings.max_batch_size)
    worker = EngineWorker(engine, metrics, settings.max_queue, device, dtype, settings.threads)
    worker.start()
    return ServedModel(path, model, tokenizer, worker, template, "int8" if is_quantized(model) else "none",
                       parameters, device, dtype, reward_path, reward)


def check_reward_checkpoint(path: Path, fingerprint: str | None) -> None:
    """UsageError unless ``path`` is a file whose recorded tokenizer fingerprint (if any) is ``fingerprint``."""
    if not path.is_file():
        raise UsageError(f"--reward_model {path} is not a file; pass a reward-model checkpoint (.pth)")
    recorded = checkpoint_metadata(path).get("tokenizer_fingerprint")
    if fingerprint is not None and recorded is not None and recorded != fingerprint:
        raise UsageError(f"--reward_model {path} was trained with another tokenizer than the served model (tokenizer "
                         "fingerprint mismatch); pass a reward model trained from the served model's tokenizer")


def load_reward_model(path: Path, tokenizer, tokenizer_dir: Path, device: torch.device) -> GPTRewardModel:
    """The --reward_model checkpoint, on the served model's device, checked against the served tokenizer."""
    check_reward_checkpoint(path, tokenizer.fingerprint)
    return checkpoints.load(path, tokenizer_dir, device, expect="reward", flag="--reward_model").model


def score_candidates(s: ServedModel, prompt_ids: list[int], prompt: str, jobs: Sequence[Job],
                     texts: Sequence[str]) -> list[float]:
    """best_of scores (in the scorer thread): the reward model's score of `<s> prompt text </s>` when one is loaded,
    else the mean log-prob of each candidate's sampled tokens (its </s> included) under the served model."""
    with autocast_context(s.device, s.dtype):  # autocast state is per thread
        if s.reward_model is not None:
            return reward_scores(s.reward_model, s.tokenizer, [prompt] * len(texts), texts, s.device)
        return mean_token_logprobs(s.model, prompt_ids, [job.sequence.output_ids for job in jobs])


# ----------------------------------------------------------------------------- request schemas

def _stop_list(value: str | list[str] | None) -> list[str]:
    stops = [value] if isinstance(value, str) else list(value or [])
    if len(stops) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop strings")
    if any(not 1 <= len(s) <= MAX_STOP_LEN for s in stops):
        raise ValueError(f"each stop string must have 1 to {MAX_STOP_LEN} characters")
    return stops


def build_schemas(max_new_tokens: int, max_best_of: int = 8) -> dict[str, type[BaseModel]]:
    """Request bodies with the server's bounds in them (so /docs shows the real limits)."""
    default_len = min(100, max_new_tokens)
    best_of_bounds = dict(ge=1, le=max_best_of, description=f"1 to {max_best_of}: sample this many answers together "
                          "and return the one scored highest (the reward model, else the mean token log-prob); costs "
                          "best_of times the tokens; not with stream; greedy (temperature 0) samples once")
    temperature_bounds = dict(ge=0.0, le=5.0, description="0 = greedy; 0 to 5")
    stop_doc = f"up to {MAX_STOP} strings of 1-{MAX_STOP_LEN} characters; generation ends before the first one"
    seed_doc = "makes sampling reproducible, alone or in a batch; 0 to 2^63-1"
    top_k_doc = "keep the k most likely tokens; 0 = all; at most the vocabulary size (/health)"

    class GenerateRequest(BaseModel):
        """Continue `prefix` (the model sees `<s> prefix`)."""

        model_config = ConfigDict(extra="forbid")
        prefix: str = Field(min_length=1, description="the text to continue (non-empty)")
        max_gen_len: int = Field(default_len, ge=1, le=max_new_tokens,
                                 description=f"most new tokens, 1 to {max_new_tokens}; "
                                             "prompt + this must fit the context")
        top_k: int = Field(50, ge=0, description=top_k_doc)
        temperature: float = Field(0.8, **temperature_bounds)
        top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus mass, in (0, 1]; 1 = off")
        repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="CTRL penalty in (0, 10]; 1 = off")
        seed: int | None = Field(None, ge=0, le=2**63 - 1, description=seed_doc)
        stop: str | list[str] | None = Field(None, description=stop_doc)
        stream: bool = Field(False, description="Server-Sent Events: one `data: {\"text\"}` event per piece, "
                                                "then `data: {\"finish_reason\", \"num_tokens\"}`")
        best_of: int = Field(1, **best_of_bounds)

        @field_validator("stop")
        @classmethod
        def check_stop(cls, value: str | list[str] | None) -> list[str]:
            return _stop_list(value)

    class OpenAIRequest(BaseModel):
        """Fields shared by the OpenAI routes; unknown fields are ignored, as OpenAI clients send many."""

        model_config = ConfigDict(extra="ignore")
        model: str | None = Field(None, description="ignored: this server serves one model (/v1/models)")
        temperature: float = Field(1.0, **temperature_bounds)
        top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus mass, in (0, 1]")
        top_k: int = Field(0, ge=0, description=top_k_doc + " (extension)")
        repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="CTRL penalty in (0, 10] (extension)")
        n: int = Field(1, ge=1, le=1, description="only 1")
        seed: int | None = Field(None, ge=0, le=2**63 - 1, description=seed_doc)
        stop: str | list[str] | None = Field(None, description=stop_doc)
        stream: bool = Field(False, description="OpenAI chunks as Server-Sent Events, ending with `data: [DONE]`")
        stream_options: dict[str, Any] | None = Field(None, description="{\"include_usage\": true} adds a usage chunk")
        logprobs: bool | int | None = Field(None, description="not supported (null, false or 0 only)")

        @field_validator("stop")
        @classmethod
        def check_stop(cls, value: str | list[str] | None) -> list[str]:
            return _stop_list(value)

        @field_validator("logprobs")
        @classmethod
        def no_logprobs(cls, value: bool | int | None) -> None:
            if value:
                raise ValueError("logprobs are not supported")
            return None

    class CompletionRequest(OpenAIRequest):
        """OpenAI `POST /v1/completions`."""

        prompt: str | list[str] = Field(description="the text to continue (a list must hold exactly one string)")
        max_tokens: int = Field(min(16, max_new_tokens), ge=1, le=max_new_tokens,
                                description=f"most new tokens, 1 to {max_new_tokens}")
        echo: bool = Field(False, description="not supported (false only)")
        best_of: int = Field(1, **best_of_bounds)

        @field_validator("prompt")
        @classmethod
        def one_prompt(cls, value: str | list[str]) -> str:
            if isinstance(value, list):
                if len(value) != 1:
                    raise ValueError("send one prompt per request (a list of exactly one string)")
                value = value[0]
            if not value:
                raise ValueError("the prompt must not be empty")
            return value

        @field_validator("echo")
        @classmethod
        def no_echo(cls, value: bool) -> bool:
            if value:
                raise ValueError("echo is not supported")
            return value

    class ChatMessage(BaseModel):
        model_config = ConfigDict(extra="ignore")
        role: Literal["system", "developer", "user", "assistant"]
        content: str | list[dict[str, Any]] = Field(description="text, or OpenAI content parts of type text")

        @field_validator("content")
        @classmethod
        def text_only(cls, value: str | list[dict[str, Any]]) -> str:
            if isinstance(value, str):
                return value
            if any(part.get("type") != "text" or not isinstance(part.get("text"), str) for part in value):
                raise ValueError("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported")
            return "".join(part["text"] for part in value)

    class ChatRequest(OpenAIRequest):
        """OpenAI `POST /v1/chat/completions`: messages rendered with the checkpoint's SFT template."""

        messages: list[ChatMessage] = Field(min_length=1, max_length=256,
                                            description="system/user/assistant turns, ending with a user turn")
        max_tokens: int | None = Field(None, ge=1, le=max_new_tokens,
                                       description=f"most new tokens, 1 to {max_new_tokens} (default: what fits)")
        max_completion_tokens: int | None = Field(None, ge=1, le=max_new_tokens, description="alias of max_tokens")

        @field_validator("messages")
        @classmethod
        def ends_with_user(cls, value: list[ChatMessage]) -> list[ChatMessage]:
            if value[-1].role != "user":
                raise ValueError("the last message must be the user's")
            return value

    return {"generate": GenerateRequest, "completion": CompletionRequest, "chat": ChatRequest}


class GenerateResponse(BaseModel):
    prefix: str
    generated_text: str
    num_tokens: int = Field(description="tokens generated (a closing </s> not counted)")
    finish_reason: str = Field(description="eos (</s>), stop (a stop string), length (max_gen_len or the context)")
    latency_ms: float


# ----------------------------------------------------------------------------- the app


class APIError(HTTPException):
    """An HTTP error with an OpenAI-style body; extra headers (Retry-After, WWW-Authenticate) allowed."""


def error_body(status: int, message: str) -> dict:
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "code": status}, "detail": message}


def _readable(errors: Sequence[dict]) -> str:
    parts = []
    for e in errors:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        message = e.get("msg", "invalid")
        if e.get("type") == "json_invalid":
            message = f"malformed JSON ({e.get('ctx', {}).get('error', 'decode error')})"
            where = "body"
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


class JobStream(StreamingResponse):
    """Server-Sent Events of one job; however the response ends (done, client gone, shutdown), the job stops."""

    def __init__(self, chunks: AsyncIterator[bytes], on_close):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class ServiceMiddleware:
    """Counts requests by endpoint and status, and checks the API key (every route but /health)."""

    def __init__(self, app, state: "AppState"):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        status = 500

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            key = self.state.settings.api_key
            if key and path != "/health" and not self._authorized(scope, key):
                response = JSONResponse(error_body(401, "missing or wrong API key: send `Authorization: Bearer <key>`"),
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send_counted)
            await self.app(scope, receive, send_counted)
        finally:
            self.state.metrics.requests.labels(endpoint, str(status)).inc()

    @staticmethod
    def _authorized(scope, key: str) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key.encode())


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    served: ServedModel | None = None
    load_error: str | None = None
    started: float = field(default_factory=time.time)
    on_load_error: Any = None  # set by `python -m` to stop the server when the model cannot load


def create_app(settings: Settings | None = None) -> FastAPI:
    """The FastAPI app; the model loads in the background at startup (/health says 503 "loading" meanwhile)."""
    settings = settings or Settings.from_args([])
    state = AppState(settings)
    schemas = build_schemas(settings.max_new_tokens, settings.max_best_of)
    GenerateRequest, CompletionRequest, ChatRequest = schemas["generate"], schemas["completion"], schemas["chat"]

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = asyncio.get_running_loop().run_in_executor(None, _load, state)
        yield
        await loader
        if state.served is not None:
            await asyncio.get_running_loop().run_in_executor(None, state.served.worker.stop)
            state.served.scorer.shutdown(wait=False)

    app = FastAPI(title="GPT inference server", lifespan=lifespan, max_body_size=settings.max_body_bytes,
                  description="Continuous-batching text generation on the project's decode engine. "
                              "Errors: 401 (API key), 413 (body too large), 422 (invalid fields or prompt too long), "
                              "429 (queue full, Retry-After), 503 (loading), 504 (request timeout).")
    app.state.service = state
    app.add_middleware(ServiceMiddleware, state=state)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        body = error_body(422, _readable(exc.errors()))
        # The offending input is not echoed: it may be NaN or a lone surrogate, which JSON cannot carry.
        body["errors"] = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                          for e in exc.errors()]
        return JSONResponse(body, 422)

    def served() -> ServedModel:
        if state.served is None:
            raise APIError(503, state.load_error or "the model is loading; retry shortly", headers={"Retry-After": "5"})
        return state.served

    @app.get("/health", summary="Readiness, model and load (200 when ready, 503 while loading or if loading failed)")
    async def health():
        if state.served is None:
            status = "error" if state.load_error else "loading"
            return JSONResponse({"status": status, **({"error": state.load_error} if state.load_error else {})}, 503)
        s = state.served
        return {"status": "ok", "model": s.name, "model_path": str(s.path), "parameters": s.parameters,
                "device": str(s.device), "dtype": str(s.dtype).removeprefix("torch."), "quantization": s.quantization,
                "context_length": s.context, "vocab_size": s.vocab_size,
                "uptime_s": round(time.time() - state.started, 3),
                "active_sequences": s.worker.active, "queue_depth": s.worker.queue_depth,
                "max_batch_size": settings.max_batch_size, "max_queue": settings.max_queue,
                "reward_model": str(s.reward_path) if s.reward_path else None, "max_best_of": settings.max_best_of}

    @app.get("/metrics", summary="Prometheus metrics (text format)")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/generate", response_model=GenerateResponse,
              responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE with stream=true"}})
    async def generate(body: GenerateRequest, request: Request):
        s = served()
        ids = prompt_ids(s, body.prefix)
        params = sampling(s, body.max_gen_len, ids, body.temperature, body.top_k, body.top_p,
                          body.repetition_penalty, body.seed, body.stop)
        n = candidates(body, params)
        if not body.stream:
            job, text = await best_of(s, ids, body.prefix, params, n, request)
            return GenerateResponse(prefix=body.prefix, generated_text=text, num_tokens=job.num_tokens,
                                    finish_reason=job.finish_reason,
                                    latency_ms=round(1000 * (time.perf_counter() - job.arrival), 3))
        job = await submit(s, ids, params)

        async def events():
            async for kind, value in job_events(s, job, request):
                if kind == "text":
                    yield sse({"text": value})
                elif kind == "error":
                    yield sse({"error": error_body(value[0], value[1])["error"]})
                else:
                    yield sse({"finish_reason": value, "num_tokens": job.num_tokens})
        return streaming(s, job, await first_event(s, job, request, events()))

    @app.post("/v1/completions", summary="OpenAI-compatible text completion (stream=true: OpenAI chunks, then [DONE])")
    async def completions(body: CompletionRequest, request: Request):
        s = served()
        ids = prompt_ids(s, body.prompt)
        return await openai_response(s, body, request, ids, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions", summary="OpenAI-compatible chat (messages in the checkpoint's SFT template)")
    async def chat_completions(body: ChatRequest, request: Request):
        s = served()
        ids = chat_ids(s, body.messages)
        limit = body.max_tokens or body.max_completion_tokens
        if limit is None:
            limit = max(1, min(settings.max_new_tokens, s.context - len(ids)))
        return await openai_response(s, body, request, ids, limit, chat=True)

    @app.get("/v1/models", summary="The one served model, OpenAI format")
    async def models():
        s = served()
        return {"object": "list", "data": [{"id": s.name, "object": "model", "created": int(state.started),
                                            "owned_by": "gpt-from-scratch", "context_length": s.context}]}

    # -- helpers (closures over the settings)

    def prompt_ids(s: ServedModel, text: str) -> list[int]:
        try:
            return encode_prompt(s.tokenizer, text)
        except ValueError as err:  # e.g. a lone surrogate escaped in the JSON cannot be UTF-8 encoded
            raise APIError(422, f"the prompt cannot be encoded: {err}") from None

    def chat_ids(s: ServedModel, messages) -> list[int]:
        """The conversation rendered by prompts.render_chat (as SFT samples are written)."""
        try:
            return render_chat(s.tokenizer, messages, s.template)
        except ValueError as err:  # PromptError, or text that cannot be UTF-8 encoded
            raise APIError(422, f"the messages cannot be encoded: {err}") from None

    def sampling(s: ServedModel, max_new: int, ids: list[int], temperature: float, top_k: int, top_p: float,
                 repetition_penalty: float, seed: int | None, stop: list[str] | None) -> SamplingParams:
        limit = settings.max_prompt_tokens or s.context - 1
        if len(ids) > limit:
            raise APIError(422, f"the prompt has {len(ids)} tokens (with <s>); this server accepts at most {limit}")
        if len(ids) + max_new > s.context:
            raise APIError(422, f"prompt ({len(ids)} tokens) + max new tokens ({max_new}) = {len(ids) + max_new} "
                                f"exceeds the model's context of {s.context} tokens; shorten the prompt or ask for "
                                f"at most {s.context - len(ids)} new tokens")
        if top_k > s.vocab_size:
            raise APIError(422, f"top_k must be at most the vocabulary size {s.vocab_size}, got {top_k}")
        return SamplingParams(max_new_tokens=max_new, do_sample=temperature > 0, temperature=temperature or 1.0,
                              top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed,
                              eos_token_id=s.tokenizer.eos_token_id, stop=tuple(stop or ()))

    def candidates(body, params: SamplingParams) -> int:
        """How many samples the answer is picked from: the request's best_of, 1 when greedy (they would all agree)."""
        n = getattr(body, "best_of", 1)
        if n > 1 and body.stream:
            raise APIError(422, "best_of > 1 cannot be streamed: the best sample is known only once all of them have "
                                "finished; send stream: false, or best_of: 1")
        return n if params.do_sample else 1

    def enqueue(s: ServedModel, jobs: list[Job]) -> None:
        try:
            s.worker.submit_all(jobs)
        except QueueFull as err:
            raise APIError(429, f"server busy: {err}; retry later", headers={"Retry-After": "1"}) from None

    async def submit(s: ServedModel, ids: list[int], params: SamplingParams) -> Job:
        job = Job(ids, params, asyncio.get_running_loop())
        enqueue(s, [job])
        return job

    async def best_of(s: ServedModel, ids: list[int], prompt: str, params: SamplingParams, n: int,
                      request: Request) -> tuple[Job, str]:
        """A non-streamed answer: the one sequence, or the highest scored of n candidates sampled together (each
        with its own seed from candidate_seeds), scored in the scorer thread."""
        loop = asyncio.get_running_loop()
        jobs = [Job(ids, replace(params, seed=seed), loop, observed=n == 1) for seed in candidate_seeds(params.seed, n)]
        enqueue(s, jobs)
        texts = await collect(s, jobs, request)
        if n == 1:
            return jobs[0], texts[0]
        try:
            scores = await loop.run_in_executor(s.scorer, score_candidates, s, ids, prompt, jobs, texts)
        except RuntimeError as err:  # e.g. out of memory, or the scorer already shut down
            raise APIError(503, f"scoring the best_of samples failed: {err}") from None
        state.metrics.latency.observe(time.perf_counter() - jobs[0].arrival)
        best = max(range(n), key=scores.__getitem__)
        return jobs[best], texts[best]

    async def job_events(s: ServedModel, job: Job, request: Request) -> AsyncIterator[tuple[str, Any]]:
        """("text", piece)... then ("done", reason) or ("error", (status, message)); cancels the job if left early."""
        # One timer per request puts a "timeout" event in its queue (cheaper than a wait_for per token).
        timer = job.loop.call_later(max(0.0, job.arrival + settings.request_timeout - time.perf_counter()),
                                    job.events.put_nowait, ("timeout",))
        try:
            while True:
                event = await job.events.get()
                if event[0] == "timeout":
                    s.worker.cancel(job, "timeout")
                    yield "error", (504, f"the request took longer than {settings.request_timeout:g} s "
                                         "(--request_timeout); its sequence was stopped")
                    return
                if event[0] == "text":
                    yield event
                elif event[0] == "error":
                    yield "error", event[1:]
                    return
                else:
                    if event[1] in ("eos", "stop", "length") and job.observed:
                        state.metrics.latency.observe(time.perf_counter() - job.arrival)
                    yield event
                    return
        finally:
            timer.cancel()
            s.worker.cancel(job)  # no-op when finished; frees the slot when the client left or the task was cancelled

    async def collect(s: ServedModel, jobs: list[Job], request: Request) -> list[str]:
        """The whole texts of a non-streamed request's jobs; a client that disconnects, or one failing job (its
        error is raised), cancels them all."""
        async def consume(job: Job) -> str:
            pieces = []
            async for kind, value in job_events(s, job, request):
                if kind == "text":
                    pieces.append(value)
                elif kind == "error":
                    raise APIError(*value)
            return "".join(pieces)

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        tasks = [asyncio.ensure_future(consume(job)) for job in jobs]
        work, watch = asyncio.ensure_future(asyncio.gather(*tasks)), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():  # the client left: stop generating for it
                work.cancel()
            for task, job in zip(tasks, jobs):  # no-ops for finished ones; the others of a failed one stop
                task.cancel()
                s.worker.cancel(job)
        if not work.done() or work.cancelled():
            raise APIError(499, "client disconnected")
        return work.result()

    async def first_event(s: ServedModel, job: Job, request: Request,
                          events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """Wait for the first piece before answering, so queueing errors and timeouts still get their status code."""
        first = await events.__anext__()
        data = json.loads(first[len("data: "):])
        if "error" in data:
            await events.aclose()
            raise APIError(data["error"]["code"], data["error"]["message"])

        async def chained():
            yield first
            async for chunk in events:
                yield chunk
        return chained()

    def streaming(s: ServedModel, job: Job, chunks: AsyncIterator[bytes]) -> StreamingResponse:
        return JobStream(chunks, on_close=lambda: s.worker.cancel(job))

    async def openai_response(s: ServedModel, body, request: Request, ids: list[int], max_new: int, chat: bool):
        params = sampling(s, max_new, ids, body.temperature, body.top_k, body.top_p, body.repetition_penalty,
                          body.seed, body.stop)
        n = candidates(body, params)
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def usage() -> dict:
            return {"prompt_tokens": len(ids), "completion_tokens": job.num_tokens,
                    "total_tokens": len(ids) + job.num_tokens}

        def reason() -> str:
            return "length" if job.finish_reason == "length" else "stop"

        if not body.stream:
            job, text = await best_of(s, ids, "" if chat else body.prompt, params, n, request)
            choice = {"index": 0, "finish_reason": reason(), "logprobs": None}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            return {"id": rid, "object": kind, "created": created, "model": s.name, "choices": [choice],
                    "usage": usage()}

        def chunk(delta: str | None, finish: str | None, role: bool = False) -> bytes:
            if chat:
                payload = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": payload, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            return sse({"id": rid, "object": kind + ("" if not chat else ".chunk"), "created": created,
                        "model": s.name, "choices": [choice]})

        async def events():
            if chat:
                yield chunk(None, None, role=True)
            async for kind_, value in job_events(s, job, request):
                if kind_ == "text":
                    yield chunk(value, None)
                elif kind_ == "error":
                    yield sse({"error": error_body(value[0], value[1])["error"]})
                    return
                else:
                    yield chunk(None, reason())
            if (body.stream_options or {}).get("include_usage"):
                yield sse({"id": rid, "object": kind + ("" if not chat else ".chunk"), "created": created,
                           "model": s.name, "choices": [], "usage": usage()})
            yield b"data: [DONE]\n\n"

        job = await submit(s, ids, params)
        stream = events()
        if chat:  # the role chunk goes first; the first real event still decides the status code
            role_chunk = await stream.__anext__()
            rest = await first_event(s, job, request, stream)

            async def with_role():
                yield role_chunk
                async for c in rest:
                    yield c
            return streaming(s, job, with_role())
        return streaming(s, job, await first_event(s, job, request, stream))

    return app


def _load(state: AppState) -> None:
    """Load the model (in a worker thread at startup); a failure is reported by /health and the log."""
    try:
        state.served = load_served_model(state.settings, state.metrics)
        s = state.served
        log.info("serving %s (%s parameters, %s, %s, quantization %s) with %d slots", s.path, f"{s.parameters:,}",
                 s.device, str(s.dtype).removeprefix("torch."), s.quantization, state.settings.max_batch_size)
    except (ValueError, OSError) as err:  # bad path, corrupt checkpoint, wrong tokenizer, unknown device ...
        state.load_error = f"cannot load the model: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
        log.error(state.load_error)
        if state.on_load_error is not None:
            state.on_load_error(state.load_error)


def __getattr__(name: str):
    """`inference.api_service:app` is built on first access, from the GPT_* environment variables."""
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    settings = Settings.from_args(argv)
    path = settings.resolved_model_path()  # a missing model is a one-line error before the server starts
    if not path.is_file():
        raise UsageError(f"--model_path {path} is not a file; pass a checkpoint (.pth)")
    if settings.reward_model:  # a missing reward model, or one of another tokenizer, is also caught before starting
        check_reward_checkpoint(Path(settings.reward_model), checkpoint_metadata(path).get("tokenizer_fingerprint"))
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    app = create_app(settings)
    # One worker process: it holds the model once; scale with replicas (one per GPU) behind a load balancer.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, workers=1, log_level=settings.log_level,
                            timeout_graceful_shutdown=int(settings.shutdown_timeout) or None)
    server = uvicorn.Server(config)
    failure: list[str] = []

    def stop(message: str) -> None:
        failure.append(message)
        server.should_exit = True

    app.state.service.on_load_error = stop
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal; ignoring that replay exits with 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    server.run()
    if failure:
        raise UsageError(failure[0])
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
