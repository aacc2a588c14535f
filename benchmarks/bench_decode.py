"""The prefix cache and speculative decoding at batch 1: what one chat user waits for. Prints ONE JSON line.

    python -m benchmarks.bench_decode --num_threads 2                       # 124M shape, random weights, INT8
    python -m benchmarks.bench_decode --model_path models/sft/sft_best.pth  # a trained model: real acceptance

  - time to first token of each turn of a four-turn chat (a system message and the users' messages of a held-out demo
    dialogue, greedy replies), the engine with and without its prefix cache, medians of alternating rounds; the tokens
    reused at the fourth turn;
  - speculative decoding (prompt-lookup drafts, k tokens) against plain greedy decoding, same run: tokens/s, drafts
    accepted, tokens per forward pass, and whether the tokens are identical, on demo SFT prompts (data/sft) and on
    plain text (held-out Shakespeare lines).
Without --model_path the model is GPT-2 124M's shape with random weights (seed 0): its timings are a 124M model's,
but its greedy text loops, which a lookup draft predicts far better than it would a trained model's text.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

import checkpoints
import cli
from benchmarks.cli_options import benchmark_parser
from byte_level_bpe import ByteLevelBPETokenizer
from decoding import DecodeEngine, SamplingParams, SpeculationStats
from devices import set_threads
from gpt_model import GPTConfig, GPTModel
from prompts import CHAT_TEMPLATE, encode_prompt, render_prompt
from quantization import prepare_for_inference
from readers import read_records
from speculative import DraftParams

ROOT = Path(__file__).resolve().parent.parent
SYSTEM = ("You are a careful assistant for questions about Shakespeare's plays and about arithmetic. Answer briefly, "
          "show each step of a sum, and name the play and the speaker when you quote a line.")


def load(args) -> tuple[torch.nn.Module, ByteLevelBPETokenizer, str]:
    if args.model_path:
        loaded = checkpoints.load(args.model_path, args.tokenizer_dir, device="cpu", expect="lm")
        return loaded.model, loaded.tokenizer, loaded.template
    tokenizer = ByteLevelBPETokenizer.from_pretrained(args.tokenizer_dir or ROOT / "models" / "bpe_tokenizer")
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("gpt2", vocab_size=len(tokenizer), max_seq_len=args.context)).eval()
    return prepare_for_inference(model, quantize=args.quantize), tokenizer, CHAT_TEMPLATE


def chat_ttft(engine_args: dict, tokenizer, template: str, users: list[str], params: SamplingParams) -> dict:
    """One four-turn chat on a fresh engine: each turn's time to first token (ms) and tokens reused."""
    engine = DecodeEngine(**engine_args)
    messages, ttft, reused = [{"role": "system", "content": SYSTEM}], [], []
    for user in users:
        messages.append({"role": "user", "content": user})
        ids = render_prompt(tokenizer, messages, template).ids
        match = engine.prefix.longest(ids) if engine.prefix is not None else None  # what add() will reuse
        reused.append(match.n_tokens if match else 0)
        start = time.perf_counter()
        request = engine.add(ids, params)
        ttft.append((time.perf_counter() - start) * 1e3)
        while engine.has_work:
            engine.step()
        messages.append({"role": "assistant", "content": request.text})
    return {"ttft_ms": ttft, "reused_tokens": reused, "prompt_tokens": len(ids)}


def prefix_figures(model, tokenizer, template: str, args) -> dict:
    chats = [[m["content"] for m in r["messages"] if m["role"] == "user"]
             for _, r in read_records(ROOT / "data" / "sft" / "chat_test.json")]
    users = next(users for users in chats if len(users) >= 4)[:4]  # a four-turn demo dialogue
    params = SamplingParams(max_new_tokens=args.reply_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    runs = {"on": [], "off": []}
    for _ in range(args.repeats):  # alternating rounds: a load change hits both alike
        for mode in runs:
            engine_args = dict(model=model, tokenizer=tokenizer, n_slots=8, prefix_cache=mode == "on")
            runs[mode].append(chat_ttft(engine_args, tokenizer, template, users, params))
    median = {mode: [round(statistics.median(r["ttft_ms"][t] for r in rs), 1) for t in range(len(users))]
              for mode, rs in runs.items()}
    return {"turns": len(users), "reply_tokens": args.reply_tokens,
            "turn4_prompt_tokens": runs["on"][0]["prompt_tokens"],
            "turn4_reused_tokens": runs["on"][0]["reused_tokens"][-1],
            "ttft_ms_by_turn_with_prefix_cache": median["on"], "ttft_ms_by_turn_without": median["off"],
            "turn4_ttft_speedup": round(median["off"][-1] / median["on"][-1], 2)}


def speculative_figures(model, prompts: list[list[int]], args) -> dict:
    """Plain greedy against speculative greedy on each prompt, alternating; the same engine settings otherwise."""
    params = SamplingParams(max_new_tokens=args.new_tokens, do_sample=False)
    draft = DraftParams(k=args.k)
    seconds, tokens, same = {"plain": 0.0, "speculative": 0.0}, {"plain": 0, "speculative": 0}, True
    stats = SpeculationStats()
    for prompt in prompts:
        outputs = {}
        for mode in ("plain", "speculative"):
            engine = DecodeEngine(model, n_slots=1, speculative=draft if mode == "speculative" else None)
            start = time.perf_counter()
            outputs[mode] = engine.run([prompt], params)[0].output_ids
            seconds[mode] += time.perf_counter() - start
            tokens[mode] += len(outputs[mode])
            if mode == "speculative":
                for name in ("steps", "drafted", "accepted"):
                    setattr(stats, name, getattr(stats, name) + getattr(engine.speculation, name))
        same &= outputs["plain"] == outputs["speculative"]
    rate = {mode: tokens[mode] / seconds[mode] for mode in seconds}
    return {"prompts": len(prompts), "new_tokens": args.new_tokens, "k": args.k, "identical_tokens": same,
            "plain_tokens_per_s": round(rate["plain"], 1), "speculative_tokens_per_s": round(rate["speculative"], 1),
            "speedup": round(rate["speculative"] / rate["plain"], 2),
            "acceptance": round(stats.accepted / max(stats.drafted, 1), 3),
            "tokens_per_verify_step": round(stats.tokens_per_step, 2), "verify_steps": stats.steps}


def spec_prompts(tokenizer, template: str, n: int) -> dict[str, list[list[int]]]:
    records = [r for _, r in read_records(ROOT / "data" / "sft" / "sft_test.json")]
    by_task: dict[str, dict] = {}
    for record in records:
        by_task.setdefault(record["task"], record)
    sft = [render_prompt(tokenizer, [{"role": "user", "content": r["instruction"]}], template).ids
           for r in list(by_task.values())[:n]]
    lines = [line for line in (ROOT / "data" / "pretrain" / "val.txt").read_text(encoding="utf-8").splitlines()
             if len(line) > 200]
    text = [encode_prompt(tokenizer, line[:400]) for line in lines[:n]]
    return {"demo_sft": sft, "plain_text": text}


def build_parser() -> cli.ArgumentParser:
    parser = benchmark_parser("benchmarks.bench_decode", __doc__)
    parser.add_argument("--model_path", help="a checkpoint (float or INT8); default: 124M shape, random weights")
    parser.add_argument("--tokenizer_dir", help="tokenizer folder (default: the checkpoint's, else "
                        "models/bpe_tokenizer)")
    parser.add_argument("--quantize", choices=("none", "int8"), default="int8", help="without --model_path: weights")
    parser.add_argument("--context", type=cli.positive_int, default=1024, help="without --model_path: max_seq_len")
    parser.add_argument("--num_threads", type=cli.positive_int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=cli.positive_int, default=3, help="alternating rounds of the chat")
    parser.add_argument("--reply_tokens", type=cli.positive_int, default=32, help="most tokens per chat reply")
    parser.add_argument("--prompts", type=cli.positive_int, default=3, help="prompts per speculative set")
    parser.add_argument("--new_tokens", type=cli.positive_int, default=48, help="tokens per speculative prompt")
    parser.add_argument("--k", type=cli.positive_int, default=4, help="draft tokens per verifying pass")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The benchmark; bad flags give one `error:` line and exit 2 (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    set_threads(args.num_threads)
    model, tokenizer, template = load(args)
    DecodeEngine(model, n_slots=1).run([[tokenizer.bos_token_id] * 8], SamplingParams(max_new_tokens=8))  # warm-up
    started = time.perf_counter()
    result = {"threads": args.num_threads, "model": args.model_path or f"gpt2 124M shape, random, {args.quantize}",
              "prefix_cache": prefix_figures(model, tokenizer, template, args)}
    sets = spec_prompts(tokenizer, template, args.prompts)
    result["speculative"] = {name: speculative_figures(model, prompts, args) for name, prompts in sets.items()}
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
