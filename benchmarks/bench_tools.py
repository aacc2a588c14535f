"""The built-in calculator in multi-turn chat: exact match per turn of the held-out arithmetic dialogues, with the
calculator on and off, for an SFT checkpoint or for SFT runs (one per seed) from a pretrained one.

    python -m benchmarks.bench_tools --sft_model models/sft/sft_best.pth
    python -m benchmarks.bench_tools --pretrained models/pretrain/pretrain_best.pth --seeds 0,1,2

The dialogues of data/sft/chat_test.json (a held-out sum, then "再加 c 呢？", "再减 d 呢？", "再加 e 呢？" on the
running total) are replayed turn by turn, greedily, each turn's prompt holding the model's own earlier replies (its
calls and their results included). --through server (the default) sends every turn to the OpenAI chat endpoint of
`python -m inference.api_service` (--concurrency requests at a time), which renders the history and drops the oldest
turns only when they do not fit (counted: "dropped_turns" per turn); --through engine renders the prompts here and
decodes them in one DecodeEngine. A turn is right when the text after its last tool result is the reference answer.
"calculator_on": the engine runs the calculator on each call; "calculator_off" (the request's "calculator": false):
the model writes whatever follows its call itself. With --pretrained, `python finetune.py --mode sft` runs once per
seed (its defaults; --sft_max_steps shortens it) into --workdir first. Prints one JSON line.
"""
from __future__ import annotations

import asyncio
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import httpx
import torch
from tqdm import tqdm

import checkpoints
import cli
from benchmarks.bench_server import Served, free_port
from benchmarks.cli_options import benchmark_parser
from decoding import DecodeEngine, SamplingParams
from evaluator import turn_exact_match
from prompts import final_answer, max_prompt_len, render_prompt

ROOT = Path(__file__).resolve().parent.parent
CHAT_TEST = ROOT / "data" / "sft" / "chat_test.json"
MODES = {"calculator_on": True, "calculator_off": False}


def arithmetic_dialogues(path: Path, limit: int | None) -> list[dict]:
    """The held-out arithmetic dialogues (the first ``limit``)."""
    records = [r for r in json.loads(path.read_text(encoding="utf-8")) if r.get("task") == "arithmetic_chat"]
    return records[:limit]


def replay(loaded: checkpoints.Loaded, records: Sequence[dict], params: SamplingParams,
           batch_size: int) -> list[list[str]]:
    """Each dialogue's answers, turn by turn, with the model's own replies (written with their calls) as history."""
    engine = DecodeEngine(loaded.model, loaded.tokenizer, n_slots=min(batch_size, len(records)))
    limit = max_prompt_len(engine.max_len, params.max_new_tokens)
    users = [[m for m in r["messages"] if m["role"] == "user"] for r in records]
    histories: list[list[dict]] = [[] for _ in records]
    answers: list[list[str]] = [[] for _ in records]
    for turn in range(max(map(len, users))):
        rows = [i for i, u in enumerate(users) if len(u) > turn]
        prompts = [render_prompt(loaded.tokenizer, [*histories[i], users[i][turn]], loaded.template, limit).ids
                   for i in rows]
        for i, request in zip(rows, engine.run(prompts, params)):
            histories[i] += [users[i][turn], {"role": "assistant", "content": request.text}]
            answers[i].append(final_answer(request.text).strip())
    return answers


async def replay_server(url: str, records: Sequence[dict], max_new_tokens: int, calculator: bool,
                        concurrency: int) -> tuple[list[list[str]], list[int]]:
    """Each dialogue's replies (their calls written out), turn by turn through the server's chat endpoint, and the
    turns the server dropped to fit, summed per turn."""
    users = [[m for m in r["messages"] if m["role"] == "user"] for r in records]
    histories: list[list[dict]] = [[] for _ in records]
    replies: list[list[str]] = [[] for _ in records]
    dropped = [0] * max(map(len, users))
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        async def turn_of(i: int, turn: int) -> None:
            messages = [*histories[i], users[i][turn]]
            body = {"messages": messages, "max_tokens": max_new_tokens, "temperature": 0, "calculator": calculator}
            async with gate:
                response = await client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            answer = response.json()
            histories[i] = [*messages, {"role": "assistant", "content": answer["choices"][0]["message"]["content"]}]
            replies[i].append(histories[i][-1]["content"])
            dropped[turn] += answer["usage"].get("dropped_turns", 0)

        for turn in range(len(dropped)):
            await asyncio.gather(*(turn_of(i, turn) for i, u in enumerate(users) if len(u) > turn))
    return replies, dropped


def server_scores(checkpoint: Path, records: Sequence[dict], args) -> dict[str, dict]:
    """Exact match per turn with the calculator on and off through one server, its dropped turns, and the first
    dialogue's transcript."""
    port = free_port()
    command = [sys.executable, "-m", "inference.api_service", "--model_path", str(checkpoint), "--host", "127.0.0.1",
               "--num_threads", str(args.num_threads), "--max_batch_size", str(args.batch_size)]
    references = [[m["content"] for m in r["messages"] if m["role"] == "assistant"] for r in records]
    out = {}
    with Served([*command, "--port", str(port)], port, None) as server:
        for mode, on in tqdm(MODES.items(), desc="modes", total=len(MODES)):
            replies, dropped = asyncio.run(replay_server(server.url, records, args.max_new_tokens, on,
                                                         args.concurrency))
            figures = turn_exact_match(replies, references, [None] * len(records))
            out[mode] = {**{k: round(v, 4) for k, v in figures.items()},
                         **{f"dropped_turns/turn{n + 1}": d for n, d in enumerate(dropped)},
                         "transcript": [x for u, r in zip(records[0]["messages"][::2], replies[0])
                                        for x in (u["content"], r)]}
    return out


def scores(checkpoint: Path, records: Sequence[dict], args) -> dict[str, dict]:
    """Exact match per turn with the calculator on and off, through the server or one engine here."""
    if args.through == "server":
        return server_scores(checkpoint, records, args)
    loaded = checkpoints.load(checkpoint, device="cpu")
    references = [[m["content"] for m in r["messages"] if m["role"] == "assistant"] for r in records]
    out = {}
    for mode, on in tqdm(MODES.items(), desc="modes", total=len(MODES)):
        params = SamplingParams(max_new_tokens=args.max_new_tokens, do_sample=False,
                                eos_token_id=loaded.tokenizer.eos_token_id, calculator=on)
        predicted = replay(loaded, records, params, args.batch_size)
        out[mode] = {k: round(v, 4) for k, v in turn_exact_match(predicted, references, [None] * len(records)).items()}
    return out


def sft(pretrained: Path, output: Path, seed: int, threads: int, max_steps: int | None, flags: Sequence[str]) -> float:
    """`python finetune.py --mode sft` with its defaults, this seed, --max_steps when given and the extra flags;
    wall seconds."""
    command = [sys.executable, "finetune.py", "--mode", "sft", "--pretrained_model", str(pretrained),
               "--output_dir", str(output), "--seed", str(seed), "--num_threads", str(threads), *flags]
    command += ["--max_steps", str(max_steps)] if max_steps else []
    print("$ " + " ".join(command[1:]), file=sys.stderr, flush=True)
    started = time.time()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return round(time.time() - started, 1)


def summary(runs: dict[int, dict]) -> dict[str, dict[str, list[float]]]:
    """Per mode and turn: [mean, min, max] over the seeds."""
    first = next(iter(runs.values()))
    return {mode: {key: [round(sum(v) / len(v), 4), min(v), max(v)]
                   for key in first[mode] if key != "transcript" for v in [[run[mode][key] for run in runs.values()]]}
            for mode in MODES}


def seed_list(text: str) -> list[int]:
    """argparse type: comma-separated ints >= 0 ("0,1,2")."""
    return [cli.nonnegative_int(part.strip()) for part in text.split(",")]


def build_parser() -> cli.ArgumentParser:
    parser = benchmark_parser("benchmarks.bench_tools", __doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--sft_model", type=Path, help="an SFT checkpoint to score")
    source.add_argument("--pretrained", type=Path, help="a pretrained checkpoint: SFT once per --seeds, then score")
    parser.add_argument("--seeds", type=seed_list, default=[0, 1, 2], help="with --pretrained: comma-separated seeds")
    parser.add_argument("--workdir", type=Path, default=ROOT / "models" / "bench_tools",
                        help="with --pretrained: where each seed's SFT run is written (sft_seed<N>/)")
    parser.add_argument("--sft_max_steps", type=cli.positive_int, help="with --pretrained: shorter SFT runs")
    parser.add_argument("--sft_flags", type=shlex.split, default=[],
                        help='with --pretrained: more finetune.py flags, one string ("--max_seq_len 256")')
    parser.add_argument("--reuse", action="store_true", help="score a seed's existing sft_best.pth instead of training")
    parser.add_argument("--chat_test", type=Path, default=CHAT_TEST, help="held-out dialogues (.json)")
    parser.add_argument("--limit", type=cli.positive_int, help="score the first N arithmetic dialogues only")
    parser.add_argument("--max_new_tokens", type=cli.positive_int, default=24,
                        help="most new tokens per reply (a call, its result and the answer)")
    parser.add_argument("--batch_size", type=cli.positive_int, default=64,
                        help="dialogues decoded together (the server's --max_batch_size)")
    parser.add_argument("--through", choices=("server", "engine"), default="server",
                        help="replay through the server's chat endpoint, or one decode engine here")
    parser.add_argument("--concurrency", type=cli.positive_int, default=64, help="with --through server: requests "
                        "in flight")
    parser.add_argument("--num_threads", type=cli.positive_int, default=2, help="torch CPU threads")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The benchmark; a bad flag gives one `error:` line and exit 2 (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    source = args.sft_model or args.pretrained
    if not source.is_file():
        raise cli.UsageError(f"{source}: no such checkpoint")
    if not args.chat_test.is_file():
        raise cli.UsageError(f"--chat_test {args.chat_test}: no such file")
    records = arithmetic_dialogues(args.chat_test, args.limit)
    if not records:
        raise cli.UsageError(f"--chat_test {args.chat_test} holds no arithmetic_chat dialogues")
    torch.set_num_threads(args.num_threads)
    out: dict = {"dialogues": len(records), "torch": torch.__version__}
    if args.sft_model:
        out |= {"sft_model": str(args.sft_model), "through": args.through, **scores(args.sft_model, records, args)}
    else:
        out |= {"pretrained": str(args.pretrained), "sft_max_steps": args.sft_max_steps,
                "sft_flags": args.sft_flags, "runs": {}}
        for seed in args.seeds:
            best = args.workdir / f"sft_seed{seed}" / "sft_best.pth"
            seconds = None if args.reuse and best.is_file() else sft(args.pretrained, best.parent, seed,
                                                                       args.num_threads, args.sft_max_steps,
                                                                       args.sft_flags)
            out["runs"][seed] = {"sft_seconds": seconds, **scores(best, records, args)}
        out["summary"] = summary(out["runs"])
    print(json.dumps(out, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
