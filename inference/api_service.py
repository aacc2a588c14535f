"""HTTP serving on the decode engine: `/generate`, an OpenAI-compatible API, streaming, metrics and limits.

    uvicorn inference.api_service:app --host 127.0.0.1 --port 8000      # settings from GPT_* environment variables
    python -m inference.api_service --model_path models/sft/sft_best.pth --max_batch_size 32   # the same, as flags

One process holds one model and one `DecodeEngine`. A dedicated engine thread runs the decode loop: requests wait
in a bounded queue, are prefilled into free slots and join the running batch at the next step (continuous
batching); a finished, cancelled or timed-out sequence leaves at once. The event loop only parses requests,
tokenizes and forwards text pieces, so `/health` and `/metrics` answer promptly under full load. A best_of request
samples its candidates in the same batch and scores them in a scorer thread (the reward model, else the mean token
log-prob under the served model), off the event loop too.

A client that leaves cancels its sequence; at SIGTERM what still runs after --shutdown_timeout ends with its final
event (`DrainingServer`); the access log never holds a query value (`RedactedQuery`).

This module owns the FastAPI app (lifespan, middleware, exception handlers), its routes, `main()` with its draining
uvicorn server, the access-log filter and the lazy module-level `app`. Below it: settings.py (the settings and their
parser), schemas.py (request bodies), serving.py (the served model, best_of scoring), engine_worker.py (the engine
thread), openai_format.py (what goes on the wire) and server_metrics.py (Prometheus).
"""
from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
import signal
import socket
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from checkpoints import checkpoint_metadata, is_hf_folder
from cli import UsageError, run_cli
from decoding import SamplingParams
from inference.chat_page import chat_page, to_chat_page
from inference.engine_worker import Job, QueueFull
from grammar_constraint import GrammarError, compile_json_schema
from inference.openai_format import (DONE, APIError, EventStream, OpenAIReply, chat_logprobs, completion_logprobs,
                                     error_body, error_event, finish_reason, render_tools_prompt, sse, usage,
                                     validation_message)
from inference.schemas import (ChatMessage, ChatRequest, CompletionRequest, DetokenizeRequest, GenerateRequest,
                               GenerateResponse, OpenAIRequest, Schemas, TokenizeRequest, build_schemas)
from inference.server_metrics import Metrics
from inference.serving import (ServedModel, candidate_seeds, check_reward_checkpoint, load_served_model,
                               score_candidates)
from inference.settings import Settings
from inference.tool_calls import ToolUse, answer_schema
from prompts import (PromptTooLong, Rendered, encode_prompt, knows_tools, max_prompt_len, render_prompt,
                     render_sample)

log = logging.getLogger("inference.api_service")  # not __name__: that is "__main__" under `python -m`
COMPILE_TIMEOUT_S = 10.0  # a schema's grammar compiles in milliseconds; one that does not is refused (422)
ENDPOINTS = ("/health", "/generate", "/v1/completions", "/v1/chat/completions", "/v1/models", "/metrics",
             "/tokenize", "/detokenize", "/chat", "/", "/docs", "/openapi.json")
PUBLIC = ("/health", "/chat", "/")  # answered without the API key: the page asks for it, then sends it
FLUSH_S = 1.0  # at shutdown, time the answers ended at --shutdown_timeout get to go out before uvicorn cuts them
REDACTED = "[redacted]"


# ----------------------------------------------------------------------------- the app's state


@dataclass
class Service:
    """One app's state (`app.state.service`): settings, metrics, the served model once loaded (or why it is not)."""

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    served: ServedModel | None = None
    load_error: str | None = None
    started: float = field(default_factory=time.time)
    on_load_error: Callable[[str], None] | None = None  # set by `python -m` to stop the server when loading fails

    def ready(self) -> ServedModel:
        """The served model, else a 503 (still loading, or why loading failed)."""
        if self.served is None:
            raise APIError(503, self.load_error or "the model is loading; retry shortly", headers={"Retry-After": "5"})
        if not self.served.worker.alive:
            raise APIError(503, self.served.worker.failure or "the decode engine is not running; restart the server")
        return self.served

    def load(self) -> None:
        """Load the model (in a worker thread at startup); a failure is reported by /health and the log."""
        try:
            self.served = load_served_model(self.settings, self.metrics)
        except (ValueError, OSError) as err:  # bad path, corrupt checkpoint, wrong tokenizer, unknown device ...
            self.load_error = f"cannot load the model: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
            log.error(self.load_error)
            if self.on_load_error is not None:
                self.on_load_error(self.load_error)
            return
        s = self.served
        log.info("serving %s (%s parameters, %s, %s, quantization %s) with %d slots", s.path, f"{s.parameters:,}",
                 s.device, str(s.dtype).removeprefix("torch."), s.quantization, self.settings.max_batch_size)


def service_of(request: Request) -> Service:
    return request.app.state.service


# ----------------------------------------------------------------------------- routes
# No return annotations: FastAPI would take one for the response model.


async def health(request: Request):
    service = service_of(request)
    if service.served is None:
        status = "error" if service.load_error else "loading"
        return JSONResponse({"status": status, **({"error": service.load_error} if service.load_error else {})}, 503)
    s, settings = service.served, service.settings
    if not s.worker.alive:  # supervised: a dead engine thread is not "ok"
        return JSONResponse({"status": "error", "error": s.worker.failure or "the decode engine is not running"}, 503)
    return {"status": "ok", "model": s.name, "model_path": str(s.path), "parameters": s.parameters,
            "device": str(s.device), "dtype": str(s.dtype).removeprefix("torch."), "quantization": s.quantization,
            "context_length": s.context, "vocab_size": s.vocab_size,
            "uptime_s": round(time.time() - service.started, 3),
            "active_sequences": s.worker.active, "queue_depth": s.worker.queue_depth,
            "max_batch_size": settings.max_batch_size, "max_queue": settings.max_queue,
            "reward_model": str(s.reward_path) if s.reward_path else None, "max_best_of": settings.max_best_of}


async def metrics(request: Request):
    return Response(generate_latest(service_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def generate(body: GenerateRequest, request: Request):
    service = service_of(request)
    s = service.ready()
    ids = await run_in_threadpool(prompt_ids, s, body.prefix)
    params = sampling(service.settings, s, body, ids, body.max_gen_len)
    n = candidates(body, params)
    if not body.stream:
        job, text = await best_of(service, s, ids, params, n, request)
        return GenerateResponse(prefix=body.prefix, generated_text=text, num_tokens=job.num_tokens,
                                finish_reason=job.finish_reason,
                                latency_ms=round(1000 * (time.perf_counter() - job.arrival), 3))
    job = submit(s, ids, params)
    return await event_stream(s, job, generate_events(service, s, job))


async def completions(body: CompletionRequest, request: Request):
    service = service_of(request)
    s = service.ready()
    ids = await run_in_threadpool(prompt_ids, s, body.prompt)
    return await openai_response(service, s, body, request, ids, body.max_tokens, chat=False)


async def chat_completions(body: ChatRequest, request: Request):
    service = service_of(request)
    s = service.ready()
    settings = service.settings
    wanted = body.max_tokens or body.max_completion_tokens
    room = s.context - wanted if wanted else max_prompt_len(s.context, settings.max_new_tokens)
    room = max(1, min(room, settings.max_prompt_tokens or s.context - 1))
    prompt = await run_in_threadpool(chat_prompt, s, body.messages, room, body.tools)  # encoding off the event loop
    limit = wanted or max(1, min(settings.max_new_tokens, s.context - len(prompt.ids)))
    answer = await openai_response(service, s, body, request, prompt.ids, limit, True, prompt.dropped_turns)
    headers = {"X-Dropped-Turns": str(prompt.dropped_turns)}  # the oldest turns left out to fit the context
    if isinstance(answer, EventStream):
        answer.headers.update(headers)
        return answer
    return JSONResponse(answer, headers=headers)


async def tokenize(body: TokenizeRequest, request: Request):
    """vLLM's /tokenize: the ids generation would see (a chat's with no turn dropped)."""
    s = service_of(request).ready()
    if body.messages is not None and body.add_generation_prompt:
        if body.messages[-1].role not in ("user", "tool"):
            raise APIError(422, "add_generation_prompt needs the last message to be the user's (or a tool's result)")
        ids = (await run_in_threadpool(chat_prompt, s, body.messages, 1 << 30)).ids
    elif body.messages is not None:  # a whole conversation, as a training sample holds it
        sample = render_sample(s.tokenizer, render_tools_prompt(body.messages, None), s.template, max_seq_len=1 << 30)
        if sample is None:
            raise APIError(422, "without add_generation_prompt the messages must hold an assistant answer")
        ids = sample.input_ids
    else:
        encode = prompt_ids if body.add_special_tokens else lambda s, text: s.tokenizer.encode_ordinary(text)
        ids = await run_in_threadpool(encode, s, body.prompt)
    return {"count": len(ids), "max_model_len": s.context, "tokens": ids}


async def detokenize(body: DetokenizeRequest, request: Request):
    """vLLM's /detokenize: the text of token ids, special tokens written out."""
    s = service_of(request).ready()
    if any(not 0 <= t < s.vocab_size for t in body.tokens):
        raise APIError(422, f"token ids must be in [0, {s.vocab_size})")
    return {"prompt": s.tokenizer.decode(body.tokens, skip_special_tokens=False)}


async def models(request: Request):
    service = service_of(request)
    s = service.ready()
    return {"object": "list", "data": [{"id": s.name, "object": "model", "created": int(service.started),
                                        "owned_by": "gpt-from-scratch", "context_length": s.context}]}


# ----------------------------------------------------------------------------- from a request to jobs


def prompt_ids(s: ServedModel, text: str) -> list[int]:
    return encode_prompt(s.tokenizer, text)  # text that UTF-8 cannot encode never gets here (schemas.Body: a 422)


def chat_prompt(s: ServedModel, messages: Sequence[ChatMessage], limit: int, tools: Sequence | None = None) -> Rendered:
    """The conversation as the model was trained to read it (prompts.render_prompt; tools and tool messages as
    openai_format.render_tools_prompt writes them), its oldest turns dropped until it fits ``limit`` tokens; a last
    turn that alone does not fit is a 422."""
    try:
        return render_prompt(s.tokenizer, render_tools_prompt(messages, tools), s.template, limit, on_overflow="error")
    except PromptTooLong as err:
        raise APIError(422, f"{err}, even with only the system message and the last turn: shorten the last "
                            "message or ask for fewer max_tokens") from None
    except ValueError as err:  # PromptError: messages the template cannot render
        raise APIError(422, f"the messages cannot be encoded: {err}") from None


def sampling(settings: Settings, s: ServedModel, body: GenerateRequest | OpenAIRequest, ids: list[int],
             max_new: int) -> SamplingParams:
    """The request's sampling settings, once its prompt and max new tokens are known to fit."""
    limit = settings.max_prompt_tokens or s.context - 1
    if len(ids) > limit:
        raise APIError(422, f"the prompt has {len(ids)} tokens (with <s>); this server accepts at most {limit}")
    if len(ids) + max_new > s.context:
        raise APIError(422, f"prompt ({len(ids)} tokens) + max new tokens ({max_new}) = {len(ids) + max_new} "
                            f"exceeds the model's context of {s.context} tokens; shorten the prompt or ask for "
                            f"at most {s.context - len(ids)} new tokens")
    if body.top_k > s.vocab_size:
        raise APIError(422, f"top_k must be at most the vocabulary size {s.vocab_size}, got {body.top_k}")
    return SamplingParams(max_new_tokens=max_new, do_sample=body.temperature > 0, temperature=body.temperature or 1.0,
                          top_k=body.top_k, top_p=body.top_p, repetition_penalty=body.repetition_penalty,
                          seed=body.seed, eos_token_id=s.tokenizer.eos_token_id, stop=tuple(body.stop or ()),
                          logprobs=getattr(body, "wanted_logprobs", None),
                          calculator=settings.calculator == "on" and getattr(body, "calculator", False)
                          and knows_tools(s.template))


def candidates(body: GenerateRequest | OpenAIRequest, params: SamplingParams) -> int:
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


def submit(s: ServedModel, ids: list[int], params: SamplingParams) -> Job:
    """One job, queued (from the event loop, whose events it receives)."""
    job = Job(ids, params, asyncio.get_running_loop())
    enqueue(s, [job])
    return job


# ----------------------------------------------------------------------------- from jobs to answers


async def job_events(service: Service, s: ServedModel, job: Job) -> AsyncIterator[tuple[str, Any]]:
    """("text", piece)... then ("done", reason) or ("error", (status, message)); cancels the job if left early."""
    timeout = service.settings.request_timeout
    # One timer per request puts a "timeout" event in its queue (cheaper than a wait_for per token).
    timer = job.loop.call_later(max(0.0, job.arrival + timeout - time.perf_counter()),
                                job.events.put_nowait, ("timeout",))
    try:
        while True:
            event = await job.events.get()
            if event[0] == "timeout":
                s.worker.cancel(job, "timeout")
                yield "error", (504, f"the request took longer than {timeout:g} s (--request_timeout); "
                                     "its sequence was stopped")
                return
            if event[0] == "text":
                yield event
            elif event[0] == "error":
                yield "error", event[1:]
                return
            else:
                if event[1] in ("eos", "stop", "length") and job.observed:
                    service.metrics.latency.observe(time.perf_counter() - job.arrival)
                yield event
                return
    finally:
        timer.cancel()
        s.worker.cancel(job)  # no-op when finished; frees the slot when the client left or the task was cancelled


async def job_text(service: Service, s: ServedModel, job: Job) -> str:
    """The whole text of a non-streamed job; its error is raised."""
    pieces = []
    async for kind, value in job_events(service, s, job):
        if kind == "text":
            pieces.append(value)
        elif kind == "error":
            raise APIError(*value)
    return "".join(pieces)


async def disconnected(request: Request) -> None:
    """Returns once the client has gone."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(service: Service, s: ServedModel, jobs: list[Job], request: Request) -> list[str]:
    """The whole texts of a non-streamed request's jobs; a client that disconnects (499), or one failing job (its
    error is raised), cancels them all. Every task's outcome is read, so a client leaving logs no traceback."""
    tasks = [asyncio.ensure_future(job_text(service, s, job)) for job in jobs]
    watch = asyncio.ensure_future(disconnected(request))
    try:
        waiting = {watch, *tasks}
        while not all(task.done() for task in tasks):
            done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if watch in done:
                raise APIError(499, "client disconnected")
            for task in done:
                task.result()  # a failed job's error is the request's answer (the others stop below)
        return [task.result() for task in tasks]
    finally:
        for job in jobs:  # no-ops for finished ones; the others of a failed one, or of a client gone, stop
            s.worker.cancel(job)
        settle([watch, *tasks])


def settle(tasks: Sequence[asyncio.Future]) -> None:
    """Cancel what still runs and read what ended: an outcome nobody reads is logged as a traceback later."""
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()
        task.cancel()


async def best_of(service: Service, s: ServedModel, ids: list[int], params: SamplingParams, n: int,
                  request: Request) -> tuple[Job, str]:
    """A non-streamed answer: the one sequence, or the highest scored of n candidates sampled together (each
    with its own seed from candidate_seeds), scored in the scorer thread."""
    loop = asyncio.get_running_loop()
    jobs = [Job(ids, replace(params, seed=seed), loop, observed=n == 1) for seed in candidate_seeds(params.seed, n)]
    enqueue(s, jobs)
    texts = await collect(service, s, jobs, request)
    if n == 1:
        return jobs[0], texts[0]
    try:
        scores = await loop.run_in_executor(s.scorer, score_candidates, s, ids, jobs, texts)
    except RuntimeError as err:  # e.g. out of memory, or the scorer already shut down
        raise APIError(503, f"scoring the best_of samples failed: {err}") from None
    service.metrics.latency.observe(time.perf_counter() - jobs[0].arrival)
    best = max(range(n), key=scores.__getitem__)
    return jobs[best], texts[best]


async def chain(first: Sequence[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in first:
        yield chunk
    async for chunk in rest:
        yield chunk


async def event_stream(s: ServedModel, jobs: Job | list[Job], events: AsyncIterator[bytes],
                       head: int = 1) -> EventStream:
    """The SSE response of jobs, once their first `head` events are out (the last of them a job's first), so
    queueing errors and timeouts still get their status code; however the response ends, the jobs stop."""
    jobs = [jobs] if isinstance(jobs, Job) else jobs
    first = [await events.__anext__() for _ in range(head)]
    error = json.loads(first[-1][len("data: "):]).get("error")
    if error:
        await events.aclose()
        raise APIError(error["code"], error["message"])
    return EventStream(chain(first, events), on_close=lambda: [s.worker.cancel(job) for job in jobs])


async def generate_events(service: Service, s: ServedModel, job: Job) -> AsyncIterator[bytes]:
    """/generate's stream: `{"text"}` per piece, then `{"finish_reason", "num_tokens"}` (or `{"error"}`)."""
    async for kind, value in job_events(service, s, job):
        if kind == "text":
            yield sse({"text": value})
        elif kind == "error":
            yield error_event(*value)
        else:
            yield sse({"finish_reason": value, "num_tokens": job.num_tokens})


async def sample_n(service: Service, s: ServedModel, ids: list[int], params: SamplingParams, n: int,
                   request: Request) -> tuple[list[Job], list[str]]:
    """OpenAI's n: n choices, each with its own seed (candidate_seeds), admitted together (one prefill)."""
    jobs = [Job(ids, replace(params, seed=seed), asyncio.get_running_loop())
            for seed in candidate_seeds(params.seed, n)]
    enqueue(s, jobs)
    return jobs, await collect(service, s, jobs, request)


def logprobs_of(s: ServedModel, job: Job, chat: bool, start: int = 0, end: int | None = None,
                offset: int = 0) -> dict | None:
    """The OpenAI logprobs of the job's tokens [start, end) (None when it did not ask); the closing </s> is no text."""
    if job.params.logprobs is None:
        return None
    entries = [e for e in job.logprobs[start:end] if e[0] != s.tokenizer.eos_token_id]
    return chat_logprobs(s.tokenizer, entries) if chat else completion_logprobs(s.tokenizer, entries, offset)


def tool_use(body: OpenAIRequest) -> ToolUse | None:
    """How a chat answer is read for tool calls (None: as text; also with tool_choice none)."""
    mode = getattr(body, "tool_mode", None)
    if mode in (None, "none"):
        return None
    return ToolUse(tuple(t.function.name for t in body.tools), forced=mode != "auto")


async def answer_constraint(s: ServedModel, body: OpenAIRequest) -> Callable | None:
    """The grammar a request's answer is held to (response_format, a forced tool call, or auto's call-or-format), as
    the per-sequence constraint factory of SamplingParams; compiled off the event loop, within COMPILE_TIMEOUT_S.
    A schema that cannot be served is a 422 naming the field."""
    tools = [(t.function.name, t.function.parameters) for t in getattr(body, "tools", None) or []]
    mode = getattr(body, "tool_mode", None)
    schema = answer_schema(tools, mode, body.response_format.wanted_schema if body.response_format else None)
    if schema is None:
        return None
    field = "tools" if mode not in (None, "none") else "response_format"
    try:
        text = json.dumps(schema, ensure_ascii=False)
        grammar = await asyncio.wait_for(run_in_threadpool(compile_json_schema, text, s.grammar_vocab),
                                         COMPILE_TIMEOUT_S)
    except GrammarError as err:
        raise APIError(422, f"{field}: {err}") from None
    except asyncio.TimeoutError:
        raise APIError(422, f"{field}: the schema did not compile within {COMPILE_TIMEOUT_S:g} s; "
                            "simplify it") from None
    return grammar.start


async def openai_response(service: Service, s: ServedModel, body: OpenAIRequest, request: Request, ids: list[int],
                          max_new: int, chat: bool, dropped: int | None = None) -> dict | EventStream:
    """A completion or chat completion, OpenAI format: one body, or chunks ending with `data: [DONE]`."""
    params = sampling(service.settings, s, body, ids, max_new)
    best = candidates(body, params)
    if body.n > 1 and best > 1:
        raise APIError(422, "n and best_of cannot both be above 1: ask for n choices, or for the best of best_of")
    params = replace(params, constraint=await answer_constraint(s, body))
    reply = OpenAIReply.new(s.name, chat, tool_use(body))
    if not body.stream:
        if body.n == 1:
            job, text = await best_of(service, s, ids, params, best, request)
            jobs, texts = [job], [text]
        else:
            jobs, texts = await sample_n(service, s, ids, params, body.n, request)
        choices = [reply.choice(i, text, job.finish_reason, logprobs_of(s, job, chat))
                   for i, (job, text) in enumerate(zip(jobs, texts))]
        return reply.body(choices, usage(len(ids), sum(j.num_tokens for j in jobs), dropped))
    jobs = [Job(ids, replace(params, seed=seed), asyncio.get_running_loop())
            for seed in (candidate_seeds(params.seed, body.n) if body.n > 1 else [params.seed])]
    enqueue(s, jobs)
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    events = openai_events(service, s, jobs, reply, len(ids), include_usage, dropped)
    return await event_stream(s, jobs, events, head=len(jobs) + 1 if chat else 1)  # chat: role chunks first


async def merged_events(service: Service, s: ServedModel, jobs: list[Job]) -> AsyncIterator[tuple[int, str, Any]]:
    """(choice index, kind, value) of several jobs' events as they come; ends at the first error."""
    if len(jobs) == 1:
        async for kind, value in job_events(service, s, jobs[0]):
            yield 0, kind, value
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, job: Job) -> None:
        async for kind, value in job_events(service, s, job):
            await queue.put((index, kind, value))
        await queue.put((index, "end", None))

    tasks = [asyncio.ensure_future(pump(i, job)) for i, job in enumerate(jobs)]
    try:
        ended = 0
        while ended < len(jobs):
            index, kind, value = await queue.get()
            ended += kind == "end"
            if kind != "end":
                yield index, kind, value
            if kind == "error":
                return
    finally:
        settle(tasks)


async def openai_events(service: Service, s: ServedModel, jobs: list[Job], reply: OpenAIReply, n_prompt: int,
                        include_usage: bool, dropped: int | None) -> AsyncIterator[bytes]:
    """The chunks of n streamed choices: each text piece with the logprobs of the tokens it completes."""
    if reply.chat:
        for index in range(len(jobs)):
            yield reply.chunk(None, None, role=True, index=index)
    sent, offsets = [0] * len(jobs), [0] * len(jobs)
    streams = [reply.tools.stream() for _ in jobs] if reply.tools is not None else None  # text -> tool-call deltas
    async for index, kind, value in merged_events(service, s, jobs):
        job = jobs[index]
        if kind == "error":  # the stream's final event; [DONE] still closes it, as OpenAI clients expect
            yield error_event(*value)
            yield DONE
            return
        upto = job.logprob_marks.popleft() if kind == "text" and job.logprob_marks else None
        deltas = (streams[index].push(value) if streams else [value]) if kind == "text" else \
            (streams[index].finish() if streams else [])
        if kind == "text" and not deltas:
            continue  # held back (a possible tool call): its logprobs go out with the next chunk
        logprobs = logprobs_of(s, job, reply.chat, sent[index], upto, offsets[index])
        sent[index] = len(job.logprobs) if upto is None else upto
        offsets[index] += len(value) if kind == "text" else 0
        last = len(deltas) - 1 if kind == "text" else None
        for n, delta in enumerate(deltas):
            yield reply.chunk(delta, None, index=index, logprobs=logprobs if n == last else None)
        if kind != "text":
            called = bool(streams and streams[index].called)
            yield reply.chunk(None, finish_reason(job.finish_reason, called), index=index, logprobs=logprobs)
    if include_usage:
        yield reply.usage_chunk(usage(n_prompt, sum(job.num_tokens for job in jobs), dropped))
    yield DONE


# ----------------------------------------------------------------------------- the app


class ServiceMiddleware:
    """Counts requests by endpoint and status, and checks the API key (every route but /health)."""

    def __init__(self, app, service: Service) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        status = 500

        async def send_counted(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            key = self.service.settings.api_key
            if key and path not in PUBLIC and not self._authorized(scope, key):
                response = JSONResponse(error_body(401, "missing or wrong API key: send `Authorization: Bearer <key>`"),
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send_counted)
            await self.app(scope, receive, send_counted)
        finally:
            self.service.metrics.requests.labels(endpoint, str(status)).inc()

    @staticmethod
    def _authorized(scope, key: str) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key.encode())


class RedactedQuery(logging.Filter):
    """uvicorn's access log with every query value written as [redacted]: a key sent in a URL by mistake
    (`?api_key=...`) never reaches the log. The routes read no query parameters, so nothing of use is lost."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):  # (client, method, path with query, HTTP version, status)
            record.args = tuple(redact_query(arg) if isinstance(arg, str) else arg for arg in record.args)
        return True


ACCESS_LOG_FILTER = RedactedQuery()


def redact_query(path: str) -> str:
    """`/generate?api_key=sk-1&x` -> `/generate?api_key=[redacted]&[redacted]`: names kept, values and bare items
    (which may be a key themselves) replaced; a path without a query is returned as it is."""
    base, mark, query = path.partition("?")
    if not mark:
        return path
    items = (item.partition("=") for item in query.split("&"))
    return base + "?" + "&".join(f"{name}={REDACTED}" if eq else REDACTED for name, eq, _ in items)


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse(error_body(exc.status_code, str(exc.detail)), exc.status_code, headers=exc.headers)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    body = error_body(422, validation_message(exc.errors()))
    # The offending input is not echoed: it may be NaN or a lone surrogate, which JSON cannot carry.
    body["errors"] = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                      for e in exc.errors()]
    return JSONResponse(body, 422)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The model loads in a thread while the server already answers (/health: 503 "loading"); at shutdown the
    engine thread stops, cancelling what is left."""
    service: Service = app.state.service
    loop = asyncio.get_running_loop()
    loader = loop.run_in_executor(None, service.load)
    yield
    await loader
    if service.served is not None:
        await loop.run_in_executor(None, service.served.worker.stop)
        service.served.scorer.shutdown(wait=False)


def with_body(endpoint: Callable, schema: type[BaseModel]) -> Callable:
    """`endpoint(body, request)` with `body` typed as this app's schema, whose bounds FastAPI checks and /docs shows."""
    async def route(body, request):
        return await endpoint(body, request)

    route.__name__ = route.__qualname__ = endpoint.__name__  # FastAPI's operation ids, as before
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    route.__signature__ = inspect.Signature([inspect.Parameter("body", kind, annotation=schema),
                                             inspect.Parameter("request", kind, annotation=Request)])
    return route


def add_routes(app: FastAPI, schemas: Schemas) -> None:
    get, post = ["GET"], ["POST"]
    app.add_api_route("/health", health, methods=get,
                      summary="Readiness, model and load (200 when ready, 503 while loading or if loading failed)")
    app.add_api_route("/metrics", metrics, methods=get, summary="Prometheus metrics (text format)")
    app.add_api_route("/generate", with_body(generate, schemas.generate), methods=post, response_model=GenerateResponse,
                      responses={200: {"content": {"text/event-stream": {}},
                                       "description": "JSON, or SSE with stream=true"}})
    app.add_api_route("/v1/completions", with_body(completions, schemas.completion), methods=post,
                      summary="OpenAI-compatible text completion (stream=true: OpenAI chunks, then [DONE])")
    app.add_api_route("/v1/chat/completions", with_body(chat_completions, schemas.chat), methods=post,
                      summary="OpenAI-compatible chat (messages in the checkpoint's SFT template)")
    app.add_api_route("/v1/models", models, methods=get, summary="The one served model, OpenAI format")
    app.add_api_route("/tokenize", tokenize, methods=post, summary="Token ids of a prompt or messages (vLLM's shape)")
    app.add_api_route("/chat", chat_page, methods=get, summary="The web chat page (no API key needed to load it)")
    app.add_api_route("/", to_chat_page, methods=get, include_in_schema=False)
    app.add_api_route("/detokenize", detokenize, methods=post, summary="Text of token ids (vLLM's shape)")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The FastAPI app; the model loads in the background at startup (/health says 503 "loading" meanwhile)."""
    settings = settings or Settings.from_args([])
    app = FastAPI(title="GPT inference server", lifespan=lifespan, max_body_size=settings.max_body_bytes,
                  description="Continuous-batching text generation on the project's decode engine. "
                              "Errors: 401 (API key), 413 (body too large), 422 (invalid fields or prompt too long), "
                              "429 (queue full, Retry-After), 503 (loading), 504 (request timeout).")
    app.state.service = Service(settings)
    logging.getLogger("uvicorn.access").addFilter(ACCESS_LOG_FILTER)  # once per process (the same filter object)
    app.add_middleware(ServiceMiddleware, service=app.state.service)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    add_routes(app, build_schemas(settings.max_new_tokens, settings.max_best_of))
    return app


def __getattr__(name: str) -> FastAPI:
    """`inference.api_service:app` is built on first access, from the GPT_* environment variables."""
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- CLI


def check_address(host: str, port: int) -> None:
    """A host that resolves and a port free to bind, before the model loads: else one line (not uvicorn's exit 3)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise UsageError(f"--host {host!r} cannot be resolved ({err}): pass an address such as 127.0.0.1") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            raise UsageError(f"cannot listen on {host}:{port} ({err.strerror}): pick a free --port, or stop what "
                             "uses it") from None


class DrainingServer(uvicorn.Server):
    """uvicorn's server whose graceful shutdown ends the generations still running when --shutdown_timeout is up,
    each with its final event (a stream's error event, then [DONE]; a 503 for a plain request), and leaves those
    answers FLUSH_S to go out before uvicorn cuts what is left: no stream ends without its final event."""

    def __init__(self, config: uvicorn.Config, service: Service) -> None:
        super().__init__(config)
        self.service = service

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        ending = asyncio.ensure_future(self.end_generations())
        try:
            await super().shutdown(sockets)
        finally:
            ending.cancel()

    async def end_generations(self) -> None:
        await asyncio.sleep(self.service.settings.shutdown_timeout)
        if self.service.served is not None:
            self.service.served.worker.shut_down()


def main(argv: Sequence[str] | None = None) -> int:
    settings = Settings.from_args(argv)
    path = settings.resolved_model_path()  # a missing model is a one-line error before the server starts
    if not path.is_file() and not is_hf_folder(path):
        raise UsageError(f"--model_path {path} is not a file or a Hugging Face model folder; pass a checkpoint (.pth) "
                         "or a folder with config.json")
    if settings.reward_model:  # a missing reward model, or one of another tokenizer, is also caught before starting
        check_reward_checkpoint(Path(settings.reward_model), checkpoint_metadata(path).get("tokenizer_fingerprint"))
    check_address(settings.host, settings.port)
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s: %(name)s: %(message)s")
    app = create_app(settings)
    # One worker process: it holds the model once; scale with replicas (one per GPU) behind a load balancer.
    config = uvicorn.Config(app, host=settings.host, port=settings.port, workers=1, log_level=settings.log_level,
                            timeout_graceful_shutdown=settings.shutdown_timeout + FLUSH_S)
    server = DrainingServer(config, app.state.service)
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
