"""Text generation with the KV-cache engine (decoding.DecodeEngine): one prompt, a batch, a stream, or a chat.

    python -m inference.kv_cache_infer --model_path models/pretrain/pretrain_best.pth --prompt "ROMEO:" --stream
    python -m inference.kv_cache_infer --model_path models/sft/sft_best.pth --interactive   # /reset, /quit

Prompts are `<s> text` (too long: the tail is kept, leaving room to generate); a chat is rendered by
``prompts.render_prompt`` (an optional --system message, the oldest turns dropped when the context is full). Generation
stops at `</s>`, at a stop string or after --max_new_tokens. Checkpoints load through ``checkpoints.load``: float or
INT8, on the same prepared weights as the server.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable, Iterator, Sequence

import torch

import checkpoints
import cli
from decoding import COMPILE_MODES, DecodeEngine, SamplingParams
from speculative import DraftParams
from devices import resolve_device, set_threads
from prompts import SFT_TEMPLATE, encode_prompt, knows_tools, max_prompt_len, render_prompt


def _prepare(model: torch.nn.Module, device: str | torch.device | None) -> torch.nn.Module:
    return model.to(resolve_device(device)) if device is not None else model


def with_eos(params: SamplingParams, tokenizer) -> SamplingParams:
    """``params`` stopping at the tokenizer's `</s>` (text generation always ends a sequence there)."""
    if params.eos_token_id is not None:
        return params
    return dataclasses.replace(params, eos_token_id=tokenizer.eos_token_id)


def generate_with_kv_cache(model, tokenizer, prompt: str, params: SamplingParams = SamplingParams(),
                           device: str | torch.device | None = None, compile: str = "off",
                           speculative: DraftParams | None = None) -> str:
    """The continuation of `<s> prompt` (prompt not included), decoded with the KV cache."""
    return generate_batch_with_kv_cache(model, tokenizer, [prompt], params, device, compile=compile,
                                        speculative=speculative)[0]


def generate_batch_with_kv_cache(model, tokenizer, prompts: Sequence[str], params: SamplingParams = SamplingParams(),
                                 device: str | torch.device | None = None, n_slots: int = 8,
                                 compile: str = "off", speculative: DraftParams | None = None) -> list[str]:
    """Continuations of several prompts, n_slots at a time (a finished one hands its slot to the next).

    With a seed, prompt i is sampled with seed + i: each result is reproducible on its own. compile: the decode
    step's mode (decoding.COMPILE_MODES); speculative: prompt-lookup drafts while one sequence runs alone.
    """
    model = _prepare(model, device)
    engine = DecodeEngine(model, tokenizer, n_slots=min(n_slots, max(1, len(prompts))), compile=compile,
                          speculative=speculative)
    limit = max_prompt_len(engine.max_len, params.max_new_tokens)
    params = with_eos(params, tokenizer)
    each = [params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)
            for i in range(len(prompts))]
    requests = engine.run([encode_prompt(tokenizer, p, limit) for p in prompts], each)
    return [r.text for r in requests]


def stream_with_kv_cache(model, tokenizer, prompt: str, params: SamplingParams = SamplingParams(),
                         device: str | torch.device | None = None, compile: str = "off",
                         speculative: DraftParams | None = None) -> Iterator[str]:
    """Pieces of the continuation as tokens arrive: whole UTF-8 characters, joining to generate_with_kv_cache's text."""
    model = _prepare(model, device)
    engine = DecodeEngine(model, tokenizer, n_slots=1, compile=compile, speculative=speculative)
    ids = encode_prompt(tokenizer, prompt, max_prompt_len(engine.max_len, params.max_new_tokens))
    yield from engine.stream(ids, with_eos(params, tokenizer))


# ----------------------------------------------------------------------------- chat


# a chat message longer than this is not sent: every turn re-renders the whole conversation, and no model here has a
# context that holds a tenth of it (a pasted 200,000-character line stalled the chat before the n log n encoder)
MAX_MESSAGE_CHARS = 65_536


def chat(model, tokenizer, template: str = SFT_TEMPLATE, params: SamplingParams = SamplingParams(),
         read: Callable[[str], str] | None = None, write: Callable[[str], None] | None = None,
         system: str | None = None, max_message_chars: int = MAX_MESSAGE_CHARS, compile: str = "off",
         speculative: DraftParams | None = None) -> None:
    """Terminal chat: replies stream as they are generated; /reset forgets the conversation, /quit or Ctrl-C/D end.
    A message over ``max_message_chars`` is refused with a note (the chat goes on)."""
    read = read or input
    write = write or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    params = with_eos(params, tokenizer)
    engine = DecodeEngine(model, tokenizer, n_slots=1, compile=compile, speculative=speculative)
    limit = max_prompt_len(engine.max_len, params.max_new_tokens)
    opening = [{"role": "system", "content": system}] if system else []
    messages = list(opening)
    write("chat: type a message; /reset starts over, /quit (or Ctrl-D) leaves\n")
    try:
        while True:
            message = read(">>> ").strip()
            if message == "/quit":
                break
            if message == "/reset":
                messages = list(opening)
                write("(conversation reset)\n")
                continue
            if not message:
                continue
            if len(message) > max_message_chars:
                write(f"(a message of {len(message):,} characters is over --max_message_chars {max_message_chars}: "
                      "not sent; shorten it, or raise the flag)\n")
                continue
            messages.append({"role": "user", "content": message})
            turn = sum(m["role"] == "assistant" for m in messages)  # replies so far: each turn its own seed
            reply_params = params if params.seed is None else dataclasses.replace(params, seed=params.seed + turn)
            pieces, prompt = [], render_prompt(tokenizer, messages, template, limit)
            if prompt.dropped_turns:
                write(f"(the oldest {prompt.dropped_turns} turn(s) no longer fit the context: left out)\n")
            for piece in engine.stream(prompt.ids, reply_params):
                pieces.append(piece)
                write(piece)
            write("\n")
            messages.append({"role": "assistant", "content": "".join(pieces)})
    except (EOFError, KeyboardInterrupt):
        write("\n")


# ----------------------------------------------------------------------------- CLI


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m inference.kv_cache_infer",
                                description="Generate text from a GPTModel checkpoint (float or INT8) with the "
                                            "KV-cache engine, or chat with an SFT model in the terminal.")
    parser.add_argument("--model_path", required=True, help="checkpoint (.pth), float or INT8")
    parser.add_argument("--tokenizer_dir", help="tokenizer folder (default: <checkpoint folder>/tokenizer)")
    parser.add_argument("--prompt", action="append",
                        help="text to continue (the model sees `<s> prompt`); repeat for a batch")
    parser.add_argument("--interactive", action="store_true",
                        help="chat in the terminal with the checkpoint's SFT template, streaming; /reset, /quit")
    parser.add_argument("--system", help="with --interactive: a system message that opens the conversation")
    parser.add_argument("--max_message_chars", type=cli.positive_int, default=MAX_MESSAGE_CHARS,
                        help="with --interactive: a longer message is not sent (the chat goes on)")
    parser.add_argument("--no_calculator", action="store_true",
                        help="with --interactive: do not run the built-in calculator when the model calls it (on for a "
                             "model trained with tool calls; a call and its result show in the reply)")
    parser.add_argument("--stream", action="store_true", help="print text as it is generated (one --prompt)")
    parser.add_argument("--max_new_tokens", type=cli.positive_int, default=100, help="most new tokens per reply")
    parser.add_argument("--temperature", type=cli.positive_float, default=0.8, help="sampling temperature")
    parser.add_argument("--top_k", type=cli.nonnegative_int, default=50, help="keep the k most likely tokens, 0 = all")
    parser.add_argument("--top_p", type=cli.probability, default=1.0, help="nucleus probability mass (1.0 = off)")
    parser.add_argument("--repetition_penalty", type=cli.repetition_penalty, default=1.0,
                        help="CTRL penalty in [0.01, 100], 1.0 = off")
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (sampling flags ignored)")
    parser.add_argument("--seed", type=cli.nonnegative_int,
                        help="seed for reproducible sampling (prompt i uses seed + i)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable); not part of the output")
    parser.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument("--compile", choices=COMPILE_MODES, default="off",
                        help="the decode step: off (eager), on (torch.compile: its graphs compile at their first use, "
                             "seconds to a minute each, kept on disk; pays off over long chats), static (the "
                             "compiled shapes, eager), auto (on where it measured faster in the server; so far "
                             "nowhere)")
    parser.add_argument("--speculative", type=cli.nonnegative_int, default=0, metavar="K",
                        help="speculative decoding: up to K prompt-lookup draft tokens checked per forward pass while "
                             "one sequence runs (the same greedy tokens, the same sampling distribution); 0 = off")
    parser.add_argument("--num_threads", type=cli.positive_int, help="torch CPU threads (default: torch's choice)")
    return parser


def parse_args(argv: Sequence[str] | None = None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.prompt and not args.interactive:
        parser.error("give --prompt TEXT (repeatable) or --interactive")
    if args.prompt and args.interactive:
        parser.error("--prompt and --interactive do not combine; pick one")
    if args.stream and args.prompt and len(args.prompt) > 1:
        parser.error("--stream takes a single --prompt")
    if args.system and not args.interactive:
        parser.error("--system applies to --interactive")
    if args.no_calculator and not args.interactive:
        parser.error("--no_calculator applies to --interactive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI; bad input gives one `error:` line and exit 2, Ctrl-C exits 130 (cli.run_cli)."""
    return cli.run_cli(_run, argv)


def _run(argv: Sequence[str] | None) -> int:
    args = parse_args(argv)
    set_threads(args.num_threads)
    loaded = checkpoints.load(args.model_path, args.tokenizer_dir, device=args.device, expect="lm")
    model, tokenizer = loaded.model, loaded.tokenizer
    params = SamplingParams(max_new_tokens=args.max_new_tokens, do_sample=not args.greedy, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                            seed=args.seed, eos_token_id=tokenizer.eos_token_id, stop=tuple(args.stop),
                            calculator=knows_tools(loaded.template) and not args.no_calculator)
    engine = {"compile": args.compile, "speculative": DraftParams(k=args.speculative) if args.speculative else None}
    if args.interactive:
        chat(model, tokenizer, loaded.template, params, system=args.system, max_message_chars=args.max_message_chars,
             **engine)
    elif args.stream:
        print(args.prompt[0], end="", flush=True)
        for piece in stream_with_kv_cache(model, tokenizer, args.prompt[0], params, **engine):
            print(piece, end="", flush=True)
        print()
    else:
        texts = generate_batch_with_kv_cache(model, tokenizer, args.prompt, params, **engine)
        for prompt, text in zip(args.prompt, texts):
            print(f"--- {prompt}{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
