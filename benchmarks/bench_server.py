"""Serving throughput and latency: inference/api_service.py (continuous batching) against a one-at-a-time baseline.

Prints ONE JSON line. Each server runs alone on 127.0.0.1 (a subprocess) and is driven by a bounded async client
at 1, 8 and 32 concurrent users for --duration seconds each, every user sending streamed /generate requests
back to back from the same mix (random prompt, max_gen_len from --min_new_tokens to --max_new_tokens; with --seeded
also a sampling seed, so both servers generate identical tokens), so both servers do the same work.
Per level: requests/s, generated tokens/s, p50/p95 time to first token and latency, errors, and for our
server the mean decode batch size (sequences per step, from /metrics). The baseline is the seed's design: one
engine slot behind a lock, a request generates its whole text before the next starts (its first "token"
arrives with the full text, so its time to first token is its latency).

    python -m benchmarks.bench_server                                   # default model, 20 s per level
    python -m benchmarks.bench_server --model_path models/sft/sft_best.pth --duration 30 --num_threads 2
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

import cli
from benchmarks.cli_options import benchmark_parser, positive_ints

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["ROMEO:", "JULIET:", "KING LEAR:", "HAMLET: To be", "First Citizen:", "Once upon a time",
           "The quality of mercy", "Now is the winter", "床前明月光，", "春眠不觉晓，", "《静夜思》 李白：", "白日依山尽，"]


# ----------------------------------------------------------------------------- the baseline server


def baseline_app(model_path: str, tokenizer_dir: str | None, device: str):
    """The seed's serving design on the same engine: one sequence at a time behind a lock, no streaming."""
    import torch
    from fastapi import FastAPI
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import StreamingResponse

    from checkpoints import load_model_and_tokenizer
    from decoding import DecodeEngine, SamplingParams
    from prompts import encode_prompt

    # the same loader (so the same prepared weights) as the server's: only batching differs
    model, tokenizer = load_model_and_tokenizer(model_path, tokenizer_dir, device=device)
    engine, lock = DecodeEngine(model, tokenizer, n_slots=1), threading.Lock()
    app = FastAPI()

    def run(body: dict):
        ids = encode_prompt(tokenizer, body["prefix"])
        params = SamplingParams(max_new_tokens=body["max_gen_len"], temperature=body.get("temperature", 0.8),
                                top_k=body.get("top_k", 50), seed=body.get("seed"),
                                eos_token_id=tokenizer.eos_token_id)
        with lock, torch.inference_mode():
            request = engine.run([ids], params)[0]
        return request.text, len(request.output_ids) - (request.finish_reason == "eos"), request.finish_reason

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/generate")
    async def generate(body: dict):
        text, n, reason = await run_in_threadpool(run, body)

        async def events():
            yield f"data: {json.dumps({'text': text})}\n\n"
            yield f"data: {json.dumps({'finish_reason': reason, 'num_tokens': n})}\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    return app


# ----------------------------------------------------------------------------- load


def request_mix(user: int, max_gen_len: tuple[int, int], seeded: bool):
    """An endless stream of request bodies for one user, the same for every server (seeded by the user's index).

    seeded=True gives every request its own sampling seed (identical tokens on both servers, but the engine then
    draws each sequence separately); by default requests share the server's RNG, as most clients send no seed.
    """
    rng = random.Random(user)
    while True:
        body = {"prefix": rng.choice(PROMPTS), "max_gen_len": rng.randint(*max_gen_len), "temperature": 0.8,
                "top_k": 50, "stream": True}
        seed = rng.randrange(2**31)
        yield {**body, "seed": seed} if seeded else body


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    start = time.perf_counter()
    first, final = None, None
    try:
        async with client.stream("POST", url + "/generate", json=body) as response:
            if response.status_code != 200:
                return {"error": f"status {response.status_code}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                first = first or time.perf_counter()
                if "finish_reason" in event or "error" in event:
                    final = event
    except httpx.HTTPError as err:
        return {"error": type(err).__name__}
    if final is None or "error" in final:
        return {"error": f"bad final event {final}"}
    end = time.perf_counter()
    return {"ttft": first - start, "latency": end - start, "tokens": final["num_tokens"]}


async def drive(url: str, users: int, duration: float, max_gen_len: tuple[int, int], seeded: bool) -> dict:
    """`users` clients sending requests back to back until `duration` has passed; in-flight requests finish."""
    results: list[dict] = []

    async def user(index: int, client: httpx.AsyncClient) -> None:
        mix = request_mix(index, max_gen_len, seeded)
        while time.perf_counter() < deadline:
            results.append(await one_request(client, url, next(mix)))

    limits = httpx.Limits(max_connections=users + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        start = time.perf_counter()
        deadline = start + duration
        await asyncio.gather(*(user(i, client) for i in range(users)))
        elapsed = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    ms = lambda values, q: round(1000 * float(np.percentile(values, q)), 1) if values else None  # noqa: E731
    return {"requests": len(results), "errors": len(results) - len(ok),
            "requests_per_s": round(len(ok) / elapsed, 2),
            "gen_tok_s": round(sum(r["tokens"] for r in ok) / elapsed, 1),
            "ttft_p50_ms": ms([r["ttft"] for r in ok], 50), "ttft_p95_ms": ms([r["ttft"] for r in ok], 95),
            "latency_p50_ms": ms([r["latency"] for r in ok], 50), "latency_p95_ms": ms([r["latency"] for r in ok], 95)}


def batch_stats(url: str) -> tuple[float, float]:
    """(sum, count) of the server's gpt_batch_size histogram."""
    values = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(("gpt_batch_size_sum", "gpt_batch_size_count")):
            name, value = line.split()
            values[name] = float(value)
    return values.get("gpt_batch_size_sum", 0.0), values.get("gpt_batch_size_count", 0.0)


# ----------------------------------------------------------------------------- servers


class Served:
    """A server subprocess on a free port, stopped with SIGTERM."""

    def __init__(self, command: list[str], port: int, env: dict, health: str = "/health",
                 ready_timeout: float = 180.0):
        self.url, self.health, self.ready_timeout = f"http://127.0.0.1:{port}", health, ready_timeout
        self.ready_seconds: float | None = None  # from the start to the first healthy answer
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)

    def __enter__(self) -> "Served":
        start = time.time()
        while time.time() < start + self.ready_timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"error: the server exited: {self.proc.stderr.read()[-1000:]}")
            try:
                if httpx.get(self.url + self.health, timeout=2).status_code == 200:
                    self.ready_seconds = round(time.time() - start, 1)
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"error: the server did not become ready in {self.ready_timeout:g} s")

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(name: str, command: list[str], env: dict, args, levels: list[int], max_gen_len: tuple[int, int]) -> dict:
    port = free_port()
    out = {}
    with Served(command + ["--port", str(port)], port, env) as server:
        asyncio.run(drive(server.url, 1, 0.5, max_gen_len, args.seeded))  # warm up
        for users in levels:
            print(f"{name}: {users} users for {args.duration:g} s", file=sys.stderr)
            before = batch_stats(server.url) if name == "server" else None
            row = asyncio.run(drive(server.url, users, args.duration, max_gen_len, args.seeded))
            if before is not None:
                after = batch_stats(server.url)
                row["mean_batch_size"] = round((after[0] - before[0]) / max(after[1] - before[1], 1), 2)
            out[f"u{users}"] = row
    return out


def build_parser() -> cli.ArgumentParser:
    parser = benchmark_parser("benchmarks.bench_server", __doc__)
    parser.add_argument("--model_path", help="checkpoint (default: the server's default model)")
    parser.add_argument("--tokenizer_dir", help="tokenizer folder (default: <checkpoint folder>/tokenizer)")
    parser.add_argument("--duration", type=cli.positive_float, default=20.0, help="seconds per load level")
    parser.add_argument("--users", type=positive_ints(), default="1,8,32", help="comma-separated concurrency levels")
    parser.add_argument("--min_new_tokens", type=cli.positive_int, default=24,
                        help="smallest max_gen_len a request asks for")
    parser.add_argument("--max_new_tokens", type=cli.positive_int, default=48,
                        help="largest max_gen_len a request asks for (capped so the longest prompt + it fit the "
                             "model's context)")
    parser.add_argument("--num_threads", type=cli.positive_int, default=2, help="torch CPU threads of each server")
    parser.add_argument("--device", default="cpu", help="device of both servers")
    parser.add_argument("--seeded", action="store_true", help="give every request its own seed (same tokens on "
                        "both servers; the engine then samples each sequence separately)")
    parser.add_argument("--skip_baseline", action="store_true", help="measure only the batching server")
    parser.add_argument("--serve_baseline", action="store_true", help=argparse.SUPPRESS)  # the baseline's process
    parser.add_argument("--port", type=cli.positive_int, default=8001, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The benchmark; a bad flag gives one `error:` line and exit 2 (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)

    from inference.settings import Settings

    model_path = str(Settings(model_path=args.model_path or "").resolved_model_path())
    if args.serve_baseline:  # the baseline's own process (started by the benchmark below)
        import torch
        import uvicorn

        torch.set_num_threads(args.num_threads)
        app = baseline_app(model_path, args.tokenizer_dir, args.device)
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
        return 0

    from byte_level_bpe import ByteLevelBPETokenizer
    from checkpoints import checkpoint_metadata
    from gpt_model import GPTConfig

    meta = checkpoint_metadata(model_path)
    context = GPTConfig.from_dict(meta["config"]).max_seq_len
    tokenizer = ByteLevelBPETokenizer.from_pretrained(args.tokenizer_dir or Path(model_path).parent / "tokenizer")
    longest = max(1 + len(tokenizer.encode_ordinary(p)) for p in PROMPTS)
    high = min(args.max_new_tokens, context - longest)
    max_gen_len = (min(args.min_new_tokens, high), high)
    levels = args.users
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    tok_args = ["--tokenizer_dir", args.tokenizer_dir] if args.tokenizer_dir else []

    server_cmd = [sys.executable, "-m", "inference.api_service", "--model_path", model_path, "--num_threads",
                  str(args.num_threads), "--device", args.device, "--max_batch_size", str(max(levels)), "--max_queue",
                  str(4 * max(levels)), "--log_level", "warning", *tok_args]
    result = {"model_path": model_path, "context": context, "device": args.device, "threads": args.num_threads,
              "duration_s": args.duration, "max_gen_len": list(max_gen_len), "seeded": args.seeded,
              "server": measure("server", server_cmd, env, args, levels, max_gen_len)}
    if not args.skip_baseline:
        baseline_cmd = [sys.executable, "-m", "benchmarks.bench_server", "--model_path", model_path,
                        "--num_threads", str(args.num_threads), "--device", args.device, *tok_args, "--serve_baseline"]
        result["baseline"] = measure("baseline", baseline_cmd, env, args, levels, max_gen_len)
    lo, hi = f"u{min(levels)}", f"u{max(levels)}"
    server = result["server"]
    result["server_tok_s_ratio_max_vs_1_user"] = round(server[hi]["gen_tok_s"] / server[lo]["gen_tok_s"], 2)
    if "baseline" in result:
        result["batched_vs_baseline_tok_s_at_max_users"] = round(server[hi]["gen_tok_s"] /
                                                                 result["baseline"][hi]["gen_tok_s"], 2)
    result["target_ratio_ge_4"] = result["server_tok_s_ratio_max_vs_1_user"] >= 4
    result["zero_errors"] = all(row["errors"] == 0 for row in server.values())
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
