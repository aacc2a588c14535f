"""A soak of the server (inference/api_service.py): minutes of mixed traffic with clients leaving at random, then a
SIGTERM with long streams in flight; does everything end cleanly and come back to idle?

Prints ONE JSON line and writes it to benchmarks/results/bench_soak.json (--output). The server runs as
`python -m inference.api_service` on 127.0.0.1 (a subprocess, its log kept in a file), on --model_path or on a
random `tiny` checkpoint made here (a 512-token BPE trained on a slice of the default corpus, context 1024).
--users clients send requests back to back for --seconds: non-streamed and streamed /generate, /v1/completions with
n 2, with logprobs (streamed) and with best_of 2, chat with logprobs and streamed chat with n 2; random prompts,
lengths and temperatures; a few carry `?api_key=<secret>` in the URL. A --leave share of the clients leave after
1-200 ms. Then, once the server is idle, --shutdown_streams long streams start and the server gets SIGTERM.

Reported: requests by outcome and status, 5xx, spurious 4xx (any 4xx but 429: every request sent is valid),
streams read to their end without a final event (`finish_reason` or an error event, and `[DONE]` on the OpenAI
routes), the same for the streams cut by the shutdown, tracebacks and ERROR lines in the server log, whether the
URL secret reached the log, free slots and waiting requests, and the server's RSS after a warm-up and after the load.

    python -m benchmarks.bench_soak                          # a tiny random model, 180 s
    python -m benchmarks.bench_soak --seconds 120 --users 12 --model_path models/sft/sft_best.pth
"""
from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

import cli
from atomic_file import atomic_path
from benchmarks.bench_server import free_port
from benchmarks.cli_options import benchmark_parser
from byte_level_bpe import ByteLevelBPETokenizer
from checkpoints import checkpoint_metadata, save_checkpoint
from gpt_model import GPTConfig, GPTModel
from readers import read_documents

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "bench_soak.json"
RSS_SAMPLES = 6  # the load runs in this many parts, the server's RSS taken after each
SECRET = "soak-secret-7f3a"  # sent in some URLs; must never reach the server's log
PROMPTS = ["ROMEO:", "JULIET:", "HAMLET: To be", "First Citizen:", "Once upon a time", "床前明月光，", "春眠不觉晓，"]
MIX = [  # (kind, route, body without its length and prompt, streamed)
    ("generate", "/generate", {}, False),
    ("generate stream", "/generate", {"stream": True}, True),
    ("completion n=2", "/v1/completions", {"n": 2}, False),
    ("completion logprobs stream", "/v1/completions", {"logprobs": 2, "stream": True}, True),
    ("completion best_of=2", "/v1/completions", {"best_of": 2}, False),
    ("chat logprobs", "/v1/chat/completions", {"logprobs": True, "top_logprobs": 2}, False),
    ("chat n=2 stream", "/v1/chat/completions", {"n": 2, "stream": True, "stream_options": {"include_usage": True}},
     True),
]


def build_checkpoint(folder: Path) -> Path:
    """A random `tiny` model (context 1024) and a 512-token BPE trained on the default corpus's first 2,000 lines."""
    documents = read_documents(ROOT / "data" / "pretrain" / "train.txt")
    tokenizer = ByteLevelBPETokenizer(vocab_size=512)
    tokenizer.train([text for _, text in zip(range(2000), documents)], min_frequency=2, show_progress=False)
    tokenizer.save(folder / "tokenizer")
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("tiny", vocab_size=len(tokenizer), max_seq_len=1024, dropout=0.0))
    save_checkpoint(folder / "soak.pth", model.eval(), tokenizer_fingerprint=tokenizer.fingerprint,
                    sft_template="### Q:{instruction}\n### A:{response}")
    return folder / "soak.pth"


class SoakServer:
    """`python -m inference.api_service` on a free port, its output in a log file; stopped with SIGTERM."""

    def __init__(self, args, model_path: Path, log_path: Path) -> None:
        port = free_port()
        self.url, self.log_path = f"http://127.0.0.1:{port}", log_path
        command = [sys.executable, "-m", "inference.api_service", "--model_path", str(model_path), "--port", str(port),
                   "--max_batch_size", str(args.max_batch_size), "--max_queue", str(args.max_queue),
                   "--shutdown_timeout", str(args.shutdown_timeout), "--num_threads", str(args.num_threads),
                   "--max_best_of", "2", "--max_new_tokens", str(args.long_tokens), "--log_level", "info"]
        self.log = open(log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise cli.UsageError(f"the server exited: {self.log_path.read_text(encoding='utf-8')[-1000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise cli.UsageError(f"the server did not become ready in {timeout:g} s")

    def rss_mb(self) -> float | None:
        """The server process's resident memory (Linux /proc), MiB."""
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return None
        kb = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), None)
        return None if kb is None else round(kb / 1024, 1)

    def idle(self, timeout: float = 30) -> dict:
        """/health once nothing runs or waits (after at most ``timeout`` s)."""
        deadline = time.time() + timeout
        while True:
            health = httpx.get(self.url + "/health", timeout=5).json()
            if (health["active_sequences"] == 0 and health["queue_depth"] == 0) or time.time() > deadline:
                return health
            time.sleep(0.1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@dataclass
class Outcome:
    """One request as its client saw it."""

    kind: str
    status: int | None = None  # None: the client left first; -1: the connection was cut; -2: an unreadable event
    streamed: bool = False
    final: bool = False  # the stream ended with its final event (and [DONE] on the OpenAI routes)
    error_event: str | None = None  # the message of a stream's error event
    events: list = field(default_factory=list)


def request_body(rng: random.Random, route: str, extra: dict, max_tokens: int) -> dict:
    prompt, temperature = rng.choice(PROMPTS), rng.choice([0.0, 0.8, 1.0])
    if route == "/generate":
        return {"prefix": prompt, "max_gen_len": max_tokens, "temperature": temperature, **extra}
    if route == "/v1/completions":
        return {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature or 0.7, **extra}
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": temperature,
            **extra}


def stream_ended(route: str, events: list) -> bool:
    """A stream's last events are its final one: /generate's `finish_reason` or error; an OpenAI stream's error
    event or every choice's `finish_reason` (usage chunk aside), then [DONE]."""
    if route == "/generate":
        return bool(events) and ("finish_reason" in events[-1] or "error" in events[-1])
    if not events or events[-1] != "[DONE]":
        return False
    body = [e for e in events[:-1] if not (e.get("usage") and not e.get("choices"))]
    if body and "error" in body[-1]:
        return True
    finished = {c["index"] for e in body for c in e.get("choices", []) if c.get("finish_reason")}
    wanted = {c["index"] for e in body for c in e.get("choices", [])}
    return bool(wanted) and finished == wanted


async def send(client: httpx.AsyncClient, url: str, kind: str, route: str, body: dict, streamed: bool,
               leave_after: float | None, query: str = "") -> Outcome:
    """One request; the client leaves after ``leave_after`` s (None: it reads the whole answer)."""
    outcome = Outcome(kind, streamed=streamed)

    async def whole() -> None:
        async with client.stream("POST", url + route + query, json=body) as response:
            async for line in response.aiter_lines():
                if streamed and response.status_code == 200 and line.startswith("data: "):
                    data = line[len("data: "):]
                    outcome.events.append("[DONE]" if data == "[DONE]" else json.loads(data))
            outcome.status = response.status_code
        if streamed and outcome.status == 200:
            outcome.final = stream_ended(route, outcome.events)
            errors = [e["error"]["message"] for e in outcome.events if isinstance(e, dict) and "error" in e]
            outcome.error_event = errors[-1] if errors else None

    try:
        await asyncio.wait_for(whole(), leave_after)
    except asyncio.TimeoutError:
        outcome.status = None
    except httpx.HTTPError as err:  # the server cut the connection: no answer, no final event
        outcome.status, outcome.error_event = -1, f"{type(err).__name__}: {err}"
    except json.JSONDecodeError as err:  # an event split across lines: the stream cannot be read
        outcome.status, outcome.error_event = -2, f"malformed event: {err}"
    outcome.events = outcome.events[-3:]  # keep memory flat over minutes of traffic
    return outcome


async def load(url: str, users: int, seconds: float, leave: float, rng: random.Random,
               max_tokens: int = 64) -> list[Outcome]:
    """``users`` clients sending the mix back to back for ``seconds`` (4 to ``max_tokens`` new tokens each); each
    leaves early with probability ``leave``."""
    outcomes: list[Outcome] = []
    deadline = time.perf_counter() + seconds

    async def user(client: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            kind, route, extra, streamed = rng.choice(MIX)
            body = request_body(rng, route, extra, rng.randint(4, max_tokens))
            leave_after = rng.uniform(0.001, 0.2) if rng.random() < leave else None
            query = f"?api_key={SECRET}" if rng.random() < 0.05 else ""
            outcomes.append(await send(client, url, kind, route, body, streamed, leave_after, query))

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=users + 4)) as client:
        await asyncio.gather(*(user(client) for _ in range(users)))
    return outcomes


async def shutdown_during_streams(server: SoakServer, n: int, max_tokens: int) -> tuple[list[Outcome], float]:
    """``n`` long streams of the streamed kinds, SIGTERM once every slot runs one (the others wait), each read to
    its end; and the time the signal was sent."""
    streamed = [m for m in MIX if m[3]]
    rng = random.Random(1)
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=n + 4)) as client:
        tasks = []
        for i in range(n):
            kind, route, extra, _ = streamed[i % len(streamed)]
            body = request_body(rng, route, extra, max_tokens)
            tasks.append(asyncio.ensure_future(send(client, server.url, kind, route, body, True, None)))
        await asyncio.sleep(0.5)
        while httpx.get(server.url + "/health", timeout=5).json()["active_sequences"] < min(n, server_slots(server)):
            await asyncio.sleep(0.05)
        server.proc.send_signal(signal.SIGTERM)
        sent = time.time()
        return list(await asyncio.gather(*tasks)), sent


def server_slots(server: SoakServer) -> int:
    return httpx.get(server.url + "/health", timeout=5).json()["max_batch_size"]


def count(outcomes: list[Outcome]) -> dict:
    """The load's outcomes: by kind and status, 5xx, spurious 4xx, streams without a final event."""
    done = [o for o in outcomes if o.status is not None]
    statuses: dict[str, int] = {}
    for o in done:
        statuses[str(o.status)] = statuses.get(str(o.status), 0) + 1
    kinds = {kind: sum(o.kind == kind for o in outcomes) for kind, *_ in MIX}
    read = [o for o in done if o.streamed and o.status == 200]
    return {"requests": len(outcomes), "completed": len(done), "clients_left": len(outcomes) - len(done),
            "by_kind": kinds, "by_status": dict(sorted(statuses.items())),
            "5xx": sum(o.status >= 500 for o in done),
            "spurious_4xx": sum(400 <= o.status < 500 and o.status != 429 for o in done),
            "429": statuses.get("429", 0), "connections_cut": statuses.get("-1", 0),
            "malformed_events": statuses.get("-2", 0),
            "streams_read_to_the_end": len(read), "streams_without_final_event": sum(not o.final for o in read),
            "stream_error_events": sum(o.error_event is not None for o in read),
            "first_problems": sorted({f"{o.kind}: {o.status} {o.error_event or ''}".strip() for o in done
                                      if o.status != 200 or (o.streamed and not o.final) or o.error_event})[:5]}


def log_figures(log_path: Path) -> dict:
    text = log_path.read_text(encoding="utf-8", errors="replace")
    errors = [line for line in text.splitlines() if line.startswith(("ERROR", "CRITICAL"))]
    return {"log_lines": text.count("\n"), "log_tracebacks": text.count("Traceback"),
            "log_never_retrieved": text.count("never retrieved"), "log_error_lines": len(errors),
            "log_first_errors": errors[:3], "url_secret_in_log": SECRET in text,
            "url_secret_requests_logged": text.count("api_key=[redacted]")}


def metric_sums(url: str, prefix: str) -> dict[str, float]:
    """The samples of /metrics whose name starts with ``prefix`` (name{labels} -> value)."""
    text = httpx.get(url + "/metrics", timeout=5).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(prefix)}


def shutdown_figures(outcomes: list[Outcome], server: SoakServer, sent: float) -> dict:
    """The streams sent before SIGTERM: how each ended (a stream that had not started yet is a whole 503 answer),
    and how the server exited."""
    try:
        code = server.proc.wait(60)
    except subprocess.TimeoutExpired:
        code = None
    exited = time.time()
    ended = [o for o in outcomes if o.status == 200 and o.final]
    refused = [o for o in outcomes if o.status == 503]
    return {"streams": len(outcomes), "ended_with_final_event": len(ended),
            "cut_by_shutdown": sum(o.error_event is not None and "shutting down" in o.error_event for o in ended),
            "not_started_answered_503": len(refused), "without_final_event": len(outcomes) - len(ended) - len(refused),
            "problems": sorted({f"{o.kind}: {o.status} {o.error_event or ''}" for o in outcomes
                                if o not in ended and o not in refused}),
            "exit_code": code, "exit_s_after_sigterm": round(exited - sent, 2)}


def soak(args, model_path: Path, log_path: Path) -> dict:
    """Warm up, measure idle, run the load, measure idle again, then SIGTERM during long streams."""
    server = SoakServer(args, model_path, log_path)
    try:
        server.wait_ready()
        rng = random.Random(args.seed)
        asyncio.run(load(server.url, args.users, args.warmup_seconds, args.leave, rng, args.max_tokens))
        before = server.idle()
        rss_before = server.rss_mb()
        started, outcomes, rss_during = time.perf_counter(), [], []
        for part in range(RSS_SAMPLES):  # in parts, the server's RSS taken between them
            print(f"soak: {args.users} users, part {part + 1}/{RSS_SAMPLES} of {args.seconds:g} s", file=sys.stderr)
            outcomes += asyncio.run(load(server.url, args.users, args.seconds / RSS_SAMPLES, args.leave, rng,
                                         args.max_tokens))
            rss_during.append(server.rss_mb())
        elapsed = time.perf_counter() - started
        after = server.idle()
        rss_after = server.rss_mb()
        tokens = metric_sums(server.url, "gpt_generated_tokens_total")
        finished = metric_sums(server.url, "gpt_sequences_finished_total")
        print(f"soak: SIGTERM with {args.shutdown_streams} streams in flight", file=sys.stderr)
        streams, sent = asyncio.run(shutdown_during_streams(server, args.shutdown_streams, args.long_tokens))
        shutdown = shutdown_figures(streams, server, sent)
    finally:
        server.close()
    return {**count(outcomes), "load_seconds": round(elapsed, 1),
            "requests_per_s": round(len(outcomes) / elapsed, 2),
            "generated_tokens": sum(tokens.values()),
            "finished_by_reason": {k.split('"')[1]: v for k, v in finished.items()},
            "slots": before["max_batch_size"],
            "slots_free_before": before["max_batch_size"] - before["active_sequences"],
            "slots_free_after": after["max_batch_size"] - after["active_sequences"],
            "queue_depth_after": after["queue_depth"], "rss_mb_before": rss_before, "rss_mb_during": rss_during,
            "rss_mb_after": rss_after,
            "rss_growth_mb": None if rss_before is None or rss_after is None else round(rss_after - rss_before, 1),
            "shutdown": shutdown, **log_figures(log_path)}


def build_parser() -> cli.ArgumentParser:
    parser = benchmark_parser("benchmarks.bench_soak", __doc__)
    parser.add_argument("--model_path", help="checkpoint to serve (default: a random tiny model made here)")
    parser.add_argument("--seconds", type=cli.positive_float, default=180.0, help="seconds of mixed traffic")
    parser.add_argument("--warmup_seconds", type=cli.positive_float, default=10.0,
                        help="seconds of the same traffic before the idle figures are taken")
    parser.add_argument("--users", type=cli.positive_int, default=12, help="concurrent clients")
    parser.add_argument("--leave", type=cli.probability, default=0.3,
                        help="share of requests whose client leaves after 1-200 ms")
    parser.add_argument("--max_batch_size", type=cli.positive_int, default=4, help="the server's slots")
    parser.add_argument("--max_queue", type=cli.positive_int, default=64, help="the server's waiting places")
    parser.add_argument("--shutdown_timeout", type=cli.nonnegative_float, default=3.0,
                        help="the server's --shutdown_timeout: the long streams run past it")
    parser.add_argument("--shutdown_streams", type=cli.positive_int, default=6, help="streams in flight at SIGTERM")
    parser.add_argument("--long_tokens", type=cli.positive_int, default=900,
                        help="max tokens of each stream in flight at SIGTERM (the model's context must hold it)")
    parser.add_argument("--num_threads", type=cli.positive_int, default=1, help="the server's torch CPU threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the traffic")
    parser.add_argument("--output", default=str(RESULTS), help="where the JSON result is written")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The benchmark; a bad flag gives one `error:` line and exit 2 (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    output = Path(args.output)
    if output.is_dir():
        raise cli.UsageError(f"--output {output} is a folder: pass a file path")
    if args.model_path and not Path(args.model_path).is_file():
        raise cli.UsageError(f"--model_path {args.model_path} is not a file; pass a checkpoint (.pth)")
    context = checkpoint_metadata(args.model_path)["config"]["max_seq_len"] if args.model_path else 1024
    args.max_tokens = max(4, min(64, context // 2))  # a short prompt (chat template included) + this fits
    if args.long_tokens > context - 32:
        raise cli.UsageError(f"--long_tokens {args.long_tokens} does not fit the model's context of {context} tokens "
                             f"with a prompt: pass at most {context - 32}")
    with tempfile.TemporaryDirectory(prefix="bench_soak_") as tmp:
        model_path = Path(args.model_path) if args.model_path else build_checkpoint(Path(tmp))
        results = {"model": args.model_path or "random tiny (context 1024, vocabulary 512)", "users": args.users,
                   "seconds": args.seconds, "leave": args.leave, "max_batch_size": args.max_batch_size,
                   "max_queue": args.max_queue, "shutdown_timeout": args.shutdown_timeout,
                   "num_threads": args.num_threads, **soak(args, model_path, Path(tmp) / "server.log")}
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp_file:
        tmp_file.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps(results, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
