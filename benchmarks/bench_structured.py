"""The per-token cost of grammar-constrained decoding: decode steps of a random model with every slot held to a JSON
schema (grammar_constraint, llguidance) against the same steps with no grammar, at each batch size, same run.

Prints ONE JSON line: per batch size, ms per decode step without and with the grammars (end to end, which on a busy
machine swings more than the mask costs), and the mask's own cost measured inside the grammar runs: the grammar
library's time per sequence-token (allowed tokens + accepting the sampled one, timed around each call) and the
torch side per step (decoding.apply_constraints stacking B masks and filling the logits, timed on its own); their
sum per step and its share of the step. Plus the schema's compile time and the tokenizer adapter's build time.

The tokenizer is trained here on --corpus at --vocab_size (seconds); the schema (objects in an array of at least
10,000 items: enums, booleans, bounded integers and strings) never lets a sequence end early, so the batch stays
full. The runs alternate (after a warm-up), best of --repeats.

    python -m benchmarks.bench_structured                          # tiny model, vocab 8192, batch 1 and 32
    python -m benchmarks.bench_structured --shape small --batch_sizes 1,8,32 --num_threads 1
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import cli
from benchmarks.cli_options import benchmark_parser, positive_ints
from byte_level_bpe import ByteLevelBPETokenizer
from decoding import DecodeEngine, SamplingParams, apply_constraints
from devices import set_threads
from gpt_model import PRESETS, GPTConfig, GPTModel
from grammar_constraint import GrammarVocabulary, compile_json_schema
from readers import read_documents

ITEM = {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 9999}, "ok": {"type": "boolean"},
    "color": {"enum": ["red", "green", "blue", "cyan", "magenta"]},
    "name": {"type": "string", "minLength": 1, "maxLength": 12},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3}},
    "required": ["id", "ok", "color", "name", "tags"], "additionalProperties": False}
SCHEMA = {"type": "array", "items": ITEM, "minItems": 10_000}  # never complete within the measured steps


def build_parser() -> cli.ArgumentParser:
    parser = benchmark_parser("benchmarks.bench_structured", __doc__)
    parser.add_argument("--corpus", default="data/pretrain/train.txt", help="text the tokenizer is trained on")
    parser.add_argument("--vocab_size", type=cli.int_at_least(512), default=8192, help="tokenizer vocabulary")
    parser.add_argument("--shape", choices=sorted(PRESETS), default="tiny", help="GPTConfig preset of the model")
    parser.add_argument("--batch_sizes", type=positive_ints(), default=[1, 32], help="sequences decoded together")
    parser.add_argument("--steps", type=cli.positive_int, default=64, help="decode steps timed per run")
    parser.add_argument("--repeats", type=cli.positive_int, default=3, help="runs per figure (best kept)")
    parser.add_argument("--num_threads", type=cli.positive_int, default=None, help="torch CPU threads")
    return parser


class TimedState:
    """A grammar state whose allowed() and accept() calls add their time to a shared clock."""

    def __init__(self, state, clock: list[float]) -> None:
        self.state, self.clock = state, clock

    def allowed(self) -> torch.Tensor:
        start = time.perf_counter()
        mask = self.state.allowed()
        self.clock[0] += time.perf_counter() - start
        return mask

    def accept(self, token_id: int) -> None:
        start = time.perf_counter()
        self.state.accept(token_id)
        self.clock[0] += time.perf_counter() - start


def step_ms(model: GPTModel, tok: ByteLevelBPETokenizer, batch: int, steps: int, grammar=None) -> tuple[float, float]:
    """(mean ms of one decode step of `batch` sequences, µs of the grammar library per sequence-token); prefill and
    two warm-up steps excluded."""
    clock = [0.0]
    constraint = None if grammar is None else (lambda: TimedState(grammar.start(), clock))
    engine = DecodeEngine(model, tok, n_slots=batch)
    params = SamplingParams(max_new_tokens=steps + 8, seed=0, constraint=constraint)  # no eos: nobody leaves
    engine.add_many([[tok.bos_token_id]] * batch, params)
    engine.step()
    engine.step()
    clock[0] = 0.0
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    return 1000 * (time.perf_counter() - start) / steps, 1e6 * clock[0] / (steps * batch)


class FixedMask:
    """A constraint stub with a ready mask: times decoding.apply_constraints' torch work alone."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask

    def allowed(self) -> torch.Tensor:
        return self.mask

    def accept(self, token_id: int) -> None:
        pass


def apply_ms(grammar, batch: int, vocab_size: int, repeats: int = 50) -> float:
    """ms of apply_constraints on `batch` rows of logits with ready masks (the first step's, a realistic density)."""
    stubs = [FixedMask(grammar.start().allowed()) for _ in range(batch)]
    logits = torch.randn(batch, vocab_size)
    apply_constraints(logits, stubs)
    start = time.perf_counter()
    for _ in range(repeats):
        apply_constraints(logits, stubs)
    return 1000 * (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> int:
    """The benchmark; a bad flag or a missing --corpus gives one `error:` line and exit 2 (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if not Path(args.corpus).is_file():
        raise cli.UsageError(f"--corpus {args.corpus} is not a file; pass a text corpus (one document per line)")
    set_threads(args.num_threads)
    texts = [d for _, d in zip(range(20_000), read_documents(Path(args.corpus)))]
    tok = ByteLevelBPETokenizer(vocab_size=args.vocab_size)
    tok.train(texts, min_frequency=2, show_progress=False)
    start = time.perf_counter()
    vocab = GrammarVocabulary(tok)
    results = {"vocab_size": len(tok), "shape": args.shape, "steps": args.steps, "threads": torch.get_num_threads(),
               "vocabulary_build_ms": round(1000 * (time.perf_counter() - start), 2)}
    start = time.perf_counter()
    grammar = compile_json_schema(json.dumps(SCHEMA), vocab)
    results["compile_ms"] = round(1000 * (time.perf_counter() - start), 2)
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset(args.shape, vocab_size=len(tok), dropout=0.0)).eval()
    bar = tqdm(total=len(args.batch_sizes) * args.repeats * 2, desc="decode runs", file=sys.stderr)
    for batch in args.batch_sizes:
        plain, masked, library = [], [], []
        step_ms(model, tok, batch, 4)  # warm-up: a process's first decode runs are slower
        for repeat in range(args.repeats):  # alternate (and swap the order), so a machine that slows slows both
            for with_grammar in (False, True)[::1 if repeat % 2 else -1]:
                ms, us = step_ms(model, tok, batch, args.steps, grammar if with_grammar else None)
                (masked if with_grammar else plain).append(ms)
                library += [us] if with_grammar else []
            bar.update(2)
        torch_ms = apply_ms(grammar, batch, len(tok))
        mask_ms = batch * min(library) / 1000 + torch_ms
        figures = {"step_ms_plain": min(plain), "step_ms_grammar": min(masked),
                   "library_us_per_sequence_token": min(library), "apply_ms_per_step": torch_ms,
                   "mask_ms_per_step": mask_ms, "mask_share_of_step": mask_ms / min(masked)}
        results.update({f"b{batch}_{key}": round(value, 3) for key, value in figures.items()})
    bar.close()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
