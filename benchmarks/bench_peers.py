"""Our model in llama.cpp, and our engine and server against llama.cpp's, on one exported model.

A GPT-2 124M-shape model (random weights, seed 0) with the project's tokenizer is saved as our checkpoints (float and
INT8) and exported with inference.export to GGUF (F32 and Q8_0). Then, in one run, 2 threads each:
  - llama.cpp (llama-cpp-python) tokenizes our prompts as we do and generates our greedy tokens: F32 against our
    fp32 (the identical prefix is reported), Q8_0 against our fp32 and our INT8 (the share of equal tokens);
  - decode at batch 1: tokens/s of ours (checkpoint -> load_model_and_tokenizer -> generate) fp32 / INT8, and the
    same weights in a one-slot DecodeEngine(compile="on") (the compiled decode step), against llama.cpp F32 / Q8_0,
    each peer in a process of its own, every system once per repeat, a second apart;
  - the servers: ours (python -m inference.api_service) against llama-cpp-python's OpenAI-compatible server
    (python -m llama_cpp.server), each alone, ours eager (--compile off) and INT8 compiled (--compile on, its
    graphs compiled by the warm-up), at 1 / 8 / 32 concurrent users streaming /v1/completions
    (temperature 0, max_tokens 32): generated tokens/s, p50 / p95 latency and time to first token, errors. Each
    on every thread, and ours INT8 eager and llama.cpp also on one fewer (a core left to the HTTP side).

    pip install llama-cpp-python[server]        # builds llama.cpp from source: ~6-10 minutes on 2 cores
    python -m benchmarks.bench_peers --num_threads 2          # ~19 minutes (~6 with --no_compile)

Prints ONE JSON line.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

import cli
from benchmarks.bench_server import Served, free_port
from benchmarks.cli_options import benchmark_parser, positive_ints
from byte_level_bpe import ByteLevelBPETokenizer
from checkpoints import load_model_and_tokenizer, save_checkpoint
from decoding import DecodeEngine, SamplingParams, generate
from gpt_model import GPTConfig, GPTModel
from inference import export
from quantization import quantize_model_int8
from readers import read_documents

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ("ROMEO: But, soft! what light through yonder window breaks?", "LEAR: Attend the lords of France and",
           "《静夜思》 李白：床前明月光，", "HAMLET: To be, or not to be, that is the question:")


# ----------------------------------------------------------------------------- the model and its exports

def build_model(folder: Path, context: int) -> ByteLevelBPETokenizer:
    """The tokenizer (models/bpe_tokenizer, else one trained on the embedded corpus), the 124M-shape checkpoints
    (float, INT8) and their GGUF exports (F32, Q8_0), all in ``folder``."""
    tokenizer_dir = ROOT / "models" / "bpe_tokenizer"
    if (tokenizer_dir / "vocab.json").exists():
        tokenizer = ByteLevelBPETokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = ByteLevelBPETokenizer(vocab_size=8192)
        tokenizer.train(read_documents(ROOT / "data" / "pretrain" / "train.txt"), show_progress=False)
    tokenizer.save(folder / "tokenizer")
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("gpt2", vocab_size=len(tokenizer), max_seq_len=context)).eval()
    save_checkpoint(folder / "fp32.pth", model, tokenizer_fingerprint=tokenizer.fingerprint)
    save_checkpoint(folder / "int8.pth", quantize_model_int8(copy.deepcopy(model)),
                    tokenizer_fingerprint=tokenizer.fingerprint)
    for kind in ("f32", "q8_0"):
        export.export_checkpoint(str(folder / "fp32.pth"), "gguf", folder / f"{kind}.gguf", kind)
    return tokenizer


# ----------------------------------------------------------------------------- llama.cpp in its own process

def llama_worker(gguf_path: str, threads: int, context: int) -> None:
    """Answers JSON requests on stdin: {"tokenize": text} -> ids, {"generate": ids, "n": n} -> greedy ids."""
    from llama_cpp import Llama

    llm = Llama(model_path=gguf_path, n_ctx=context, n_threads=threads, n_threads_batch=threads, verbose=False)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if "tokenize" in request:
            reply = llm.tokenize(request["tokenize"].encode("utf-8"), add_bos=False, special=False)
        else:
            reply = []
            for token in llm.generate(request["generate"], temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0,
                                      reset=True):
                reply.append(token)
                if len(reply) == request["n"]:
                    break
        print(json.dumps(reply), flush=True)


class LlamaProcess:
    """A running ``llama_worker`` for one GGUF file."""

    def __init__(self, gguf_path: Path, threads: int, context: int):
        argv = [sys.executable, "-m", "benchmarks.bench_peers", "--llama_worker", str(gguf_path), "--num_threads",
                str(threads), "--context", str(context)]
        self.process = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        json.loads(self.process.stdout.readline())

    def ask(self, request: dict) -> list[int]:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


# ----------------------------------------------------------------------------- agreement and decode speed

def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict[str, float]:
    """The identical prefix (mean tokens, and whether every sequence is identical) and the share of equal tokens."""
    prefixes = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
                for x, y in zip(ours, theirs)]
    equal = sum(a == b for x, y in zip(ours, theirs) for a, b in zip(x, y)) / sum(map(len, ours))
    return {"identical": all(x == y for x, y in zip(ours, theirs)), "mean_identical_prefix": float(np.mean(prefixes)),
            "equal_share": round(equal, 3)}


SYSTEMS = ("ours_fp32", "ours_int8", "llama_cpp_f32", "llama_cpp_q8_0")
COMPILED = ("ours_fp32_compiled", "ours_int8_compiled")  # a one-slot DecodeEngine(compile="on") on the same weights


def greedy(name: str, ours: dict, peers: dict, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``prompt`` from one of SYSTEMS or COMPILED (ours: a model, or a compiled engine)."""
    params = SamplingParams(max_new_tokens=n, do_sample=False)
    if isinstance(ours.get(name), DecodeEngine):
        return ours[name].run([prompt], params)[0].output_ids
    if name.startswith("ours_"):
        out = generate(ours[name.removeprefix("ours_")], torch.tensor([prompt]), params)
        return out[0, len(prompt):].tolist()
    return peers[name.removeprefix("llama_cpp_")].ask({"generate": prompt, "n": n})


def best_seconds(run, systems: tuple[str, ...], repeats: int) -> dict[str, float]:
    """Each system's best time over ``repeats`` rounds, every system once per round, a second apart."""
    best = {name: float("inf") for name in systems}
    for _ in range(repeats):
        for name in systems:
            time.sleep(1.0)  # the previous system's idle threads stop spinning
            start = time.perf_counter()
            run(name)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


OP_CLASSES = {"int8_matmul": ("quantized::linear_dynamic", "fbgemm_linear_int8"),
              "float_matmul": ("mkldnn::_linear", "aten::addmm", "aten::mm"), "attention": ("scaled_dot_product",),
              "kv_cache_write": ("index_put",)}


def decode_profile(model: GPTModel, prompt: list[int], n: int, wall_ms: float) -> dict[str, float]:
    """Where one of our batch-1 tokens goes: torch.profiler's self CPU time per class of op, in ms per token, and
    the rest of the unprofiled time per token ``wall_ms``, spent outside any op (Python, module calls, dispatch;
    the profiled run's own wall time also holds the profiler's cost per op)."""
    ids = torch.tensor([prompt])
    generate(model, ids, SamplingParams(max_new_tokens=4, do_sample=False))
    with torch.profiler.profile() as prof:
        start = time.perf_counter()
        generate(model, ids, SamplingParams(max_new_tokens=n, do_sample=False))
        profiled_ms = 1000 * (time.perf_counter() - start) / n
    per_token = dict.fromkeys([*OP_CLASSES, "other_ops"], 0.0)
    calls = 0
    for event in prof.key_averages():
        calls += event.count
        name = next((c for c, keys in OP_CLASSES.items() if any(k in event.key for k in keys)), "other_ops")
        per_token[name] += event.self_cpu_time_total / 1000 / n
    out = {f"{name}_ms": round(ms, 2) for name, ms in per_token.items() if ms}
    out["outside_ops_ms"] = round(wall_ms - sum(per_token.values()), 2)
    out["wall_ms_per_token"], out["wall_ms_per_token_profiled"] = round(wall_ms, 2), round(profiled_ms, 2)
    out["op_calls_per_token"] = round(calls / n)
    return out


def decode_figures(args, folder: Path, tokenizer) -> dict:
    """Tokenization and greedy tokens compared, and batch-1 tokens/s of each system."""
    prompts = [[tokenizer.bos_token_id, *tokenizer.encode_ordinary(p)] for p in PROMPTS]
    ours = {name: load_model_and_tokenizer(folder / f"{name}.pth", device="cpu")[0] for name in ("fp32", "int8")}
    systems = SYSTEMS if args.no_compile else SYSTEMS + COMPILED
    for name in set(systems) & set(COMPILED):  # compiled by the agreement runs below, before any timing
        ours[name] = DecodeEngine(ours[name.split("_")[1]], n_slots=1, compile="on")
    peers = {kind: LlamaProcess(folder / f"{kind}.gguf", args.num_threads, args.context) for kind in ("f32", "q8_0")}
    try:
        out = {"tokenize_equal": all(peers["f32"].ask({"tokenize": p}) == tokenizer.encode_ordinary(p)
                                     for p in PROMPTS)}
        tokens = {name: [greedy(name, ours, peers, p, args.new_tokens) for p in prompts] for name in systems}
        out["f32_vs_ours_fp32"] = agreement(tokens["ours_fp32"], tokens["llama_cpp_f32"])
        out["q8_0_vs_ours_fp32"] = agreement(tokens["ours_fp32"], tokens["llama_cpp_q8_0"])
        out["q8_0_vs_ours_int8"] = agreement(tokens["ours_int8"], tokens["llama_cpp_q8_0"])
        for name in set(systems) & set(COMPILED):  # the compiled step's greedy tokens against the eager one's
            out[f"{name}_vs_eager"] = agreement(tokens[name.removesuffix("_compiled")], tokens[name])
        best = best_seconds(lambda name: greedy(name, ours, peers, prompts[0], args.new_tokens), systems,
                            args.repeats)
    finally:
        for worker in peers.values():
            worker.close()
    out.update({f"b1_{name}_tok_s": round(args.new_tokens / seconds, 1) for name, seconds in best.items()})
    out.update({f"b1_ms_per_token_{name}": round(1000 * seconds / args.new_tokens, 2)
                for name, seconds in best.items()})
    for name in ("int8", "fp32"):
        out[f"b1_profile_ours_{name}"] = decode_profile(ours[name], prompts[0], args.new_tokens,
                                                        out[f"b1_ms_per_token_ours_{name}"])
    out["b1_ours_fp32_over_llama_cpp_f32"] = round(best["llama_cpp_f32"] / best["ours_fp32"], 2)
    out["b1_ours_int8_over_llama_cpp_q8_0"] = round(best["llama_cpp_q8_0"] / best["ours_int8"], 2)
    if not args.no_compile:
        out["b1_ours_fp32_compiled_over_llama_cpp_f32"] = round(best["llama_cpp_f32"] / best["ours_fp32_compiled"], 2)
        out["b1_ours_int8_compiled_over_llama_cpp_q8_0"] = round(best["llama_cpp_q8_0"] / best["ours_int8_compiled"],
                                                                 2)
    return out


# ----------------------------------------------------------------------------- the servers

async def one_completion(client: httpx.AsyncClient, url: str, body: dict,
                         tokenizer: ByteLevelBPETokenizer) -> dict:
    """One streamed /v1/completions request: time to first token, latency, generated tokens (max_tokens when it ran
    to the limit; else its text re-encoded with our tokenizer: llama.cpp's server reports no usage when streaming)."""
    start, first, finish, text = time.perf_counter(), None, None, []
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return {"error": f"status {response.status_code}"}
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = (json.loads(line[6:]).get("choices") or [{}])[0]
                first = first or time.perf_counter()
                text.append(choice.get("text") or "")
                finish = choice.get("finish_reason") or finish
    except httpx.HTTPError as err:
        return {"error": type(err).__name__}
    if finish is None:
        return {"error": "no finish_reason"}
    tokens = body["max_tokens"] if finish == "length" else len(tokenizer.encode_ordinary("".join(text)))
    return {"ttft": first - start, "latency": time.perf_counter() - start, "tokens": tokens, "finish": finish}


def percentile_ms(values: list[float], q: float) -> float | None:
    return round(1000 * float(np.percentile(values, q)), 1) if values else None


async def user_loop(client: httpx.AsyncClient, url: str, first: int, deadline: float, max_tokens: int,
                    tokenizer: ByteLevelBPETokenizer, results: list[dict]) -> None:
    """One user: a request after another until the deadline, cycling through PROMPTS."""
    i = first
    while time.perf_counter() < deadline:
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
        results.append(await one_completion(client, url, body, tokenizer))
        i += 1


async def load(url: str, users: int, duration: float, max_tokens: int, tokenizer: ByteLevelBPETokenizer) -> dict:
    """``users`` concurrent streaming users for ``duration`` seconds: throughput, latency, errors (by kind)."""
    results: list[dict] = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=users + 4)) as client:
        start = time.perf_counter()
        await asyncio.gather(*(user_loop(client, url, i, start + duration, max_tokens, tokenizer, results)
                               for i in range(users)))
        elapsed = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    kinds = sorted({r["error"] for r in results if "error" in r})
    return {"requests": len(results), "errors": len(results) - len(ok), "error_kinds": kinds,
            "stopped_early": sum(r["finish"] != "length" for r in ok),
            "gen_tok_s": round(sum(r["tokens"] for r in ok) / elapsed, 1),
            "ttft_p50_ms": percentile_ms([r["ttft"] for r in ok], 50),
            "latency_p50_ms": percentile_ms([r["latency"] for r in ok], 50),
            "latency_p95_ms": percentile_ms([r["latency"] for r in ok], 95)}


def our_server(args, checkpoint: Path, threads: int, compile: str = "off") -> list[str]:
    return [sys.executable, "-m", "inference.api_service", "--model_path", str(checkpoint), "--num_threads",
            str(threads), "--max_batch_size", str(max(args.users)), "--compile", compile, "--log_level", "warning"]


def llama_cpp_server(args, gguf: Path, threads: int) -> list[str]:
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--n_threads", str(threads),
            "--n_threads_batch", str(threads), "--n_ctx", str(args.context), "--host", "127.0.0.1",
            "--verbose", "False",  # its log would fill our pipe
            "--interrupt_requests", "False"]  # by default a new request cuts the running one off; queue them


def server_commands(args, folder: Path) -> dict[str, list[str]]:
    """Both servers on every thread (the server's default), ours INT8 eager and llama.cpp also on one fewer (a core
    left to the HTTP side: the thread policy, measured)."""
    few, every = max(1, args.num_threads - 1), args.num_threads
    servers = {}
    for ours, theirs in (("fp32", "f32"), ("int8", "q8_0")):
        for threads in sorted({few, every} if ours == "int8" else {every}):
            servers[f"ours_{ours}_t{threads}"] = our_server(args, folder / f"{ours}.pth", threads)
        if ours == "int8" and not args.no_compile:
            servers[f"ours_{ours}_t{every}_compiled"] = our_server(args, folder / f"{ours}.pth", every, compile="on")
        for threads in sorted({few, every}):
            servers[f"llama_cpp_{theirs}_t{threads}"] = llama_cpp_server(args, folder / f"{theirs}.gguf", threads)
    return servers


def server_figures(args, folder: Path, tokenizer: ByteLevelBPETokenizer) -> dict:
    """Ours (fp32 and INT8 checkpoints) and llama.cpp's (F32 and Q8_0) at each concurrency level, one at a time;
    each of ours over the better of llama.cpp's runs at the top level."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCHINDUCTOR_CACHE_DIR": str(folder / "inductor")}  # cold
    out = {}
    for name, command in server_commands(args, folder).items():
        health = "/health" if name.startswith("ours") else "/v1/models"
        compiled = name.endswith("_compiled")  # its graphs compile before /health says ok: minutes on a cold cache
        port = free_port()
        with Served(command + ["--port", str(port)], port, env, health=health,
                    ready_timeout=1800 if compiled else 180) as server:
            asyncio.run(load(server.url, 1, 1.0, args.max_tokens, tokenizer))  # warm up
            out[name] = {"ready_s": server.ready_seconds}
            for users in args.users:
                print(f"{name}: {users} users for {args.duration:g} s", file=sys.stderr)
                out[name][f"u{users}"] = asyncio.run(load(server.url, users, args.duration, args.max_tokens,
                                                          tokenizer))
        if compiled:  # a second start finds the graphs in the inductor cache the first one wrote
            port = free_port()
            with Served(command + ["--port", str(port)], port, env, ready_timeout=1800) as server:
                out[name]["ready_s_warm_cache"] = server.ready_seconds
    return {**out, **server_ratios(out, [f"u{users}" for users in args.users])}


def server_ratios(runs: dict[str, dict], levels: list[str]) -> dict[str, float]:
    """Each of our servers' tokens/s over the better llama.cpp run of the same precision, per level."""
    ratios = {}
    for level in levels:
        for ours, theirs in (("fp32", "f32"), ("int8", "q8_0")):
            best = max(v[level]["gen_tok_s"] for k, v in runs.items() if k.startswith(f"llama_cpp_{theirs}_"))
            for name in [k for k in runs if k.startswith(f"ours_{ours}_t")]:
                ratios[f"{name}_over_llama_cpp_{theirs}_{level}"] = round(
                    runs[name][level]["gen_tok_s"] / max(best, 1e-9), 2)
    return ratios


# ----------------------------------------------------------------------------- CLI

def build_parser() -> cli.ArgumentParser:
    parser = benchmark_parser("benchmarks.bench_peers", __doc__)
    parser.add_argument("--num_threads", type=cli.positive_int, default=2, help="CPU threads of every system")
    parser.add_argument("--new_tokens", type=cli.positive_int, default=64, help="greedy tokens per decode run")
    parser.add_argument("--repeats", type=cli.positive_int, default=2, help="timed decode runs per system, best kept")
    parser.add_argument("--context", type=cli.int_at_least(128), default=256, help="the model's context length")
    parser.add_argument("--users", type=positive_ints(), default="1,8,32", help="server concurrency levels")
    parser.add_argument("--duration", type=cli.positive_float, default=10.0, help="seconds per server load level")
    parser.add_argument("--max_tokens", type=cli.positive_int, default=32, help="max_tokens of each server request")
    parser.add_argument("--skip_servers", action="store_true", help="measure decoding only")
    parser.add_argument("--no_compile", action="store_true", help="leave out our compiled decode step")
    parser.add_argument("--llama_worker", metavar="GGUF", help=argparse.SUPPRESS)  # the llama.cpp process
    return parser


def main(argv: list[str] | None = None) -> int:
    """The benchmark; a bad flag gives one `error:` line and exit 2 (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.llama_worker:
        llama_worker(args.llama_worker, args.num_threads, args.context)
        return 0
    try:
        import llama_cpp
    except ImportError:
        raise cli.UsageError("llama-cpp-python is not installed: pip install 'llama-cpp-python[server]' (it builds "
                             "llama.cpp from source, ~6-10 minutes on 2 cores)") from None
    torch.set_num_threads(args.num_threads)
    started = time.perf_counter()
    results = {"llama_cpp_python": llama_cpp.__version__, "threads": args.num_threads, "shape": "gpt2 (124M)",
               "context": args.context, "new_tokens": args.new_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_model(Path(tmp), args.context)
        results["vocab_size"] = len(tokenizer)
        results.update(decode_figures(args, Path(tmp), tokenizer))
        if not args.skip_servers:
            results["servers"] = server_figures(args, Path(tmp), tokenizer)
    results["bench_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
