"""Arithmetic learnability: held-out exact match of ``计算 a + b = ?`` after N finetuning steps, for one setting.

A minimal SFT loop (prompt tokens masked to -100, AdamW, warmup + cosine, gradient clipping) over a mix of
arithmetic and the other families of data/sft, then greedy decoding of the 500 held-out sums of
data/sft/sft_test.json. It exists to choose finetune.py's defaults (issue 9: >= 0.3 exact match in ~5 min on 2 CPU
cores); compare settings by steps and tokens, since the CPU is shared and wall time is noisy. Prints ONE JSON line.

    python -m benchmarks.calibrate_arithmetic --pretrained models/pretrain/pretrain_best.pth --max_steps 1500
    python -m benchmarks.calibrate_arithmetic --pretrained none --n_layers 4 --d_model 128 \
        --tokenizer_dir models/bpe_tokenizer
"""
from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run by its path, not with -m: import from the project root
    import pathlib
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # same setting as the trainer

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import cli
from benchmarks.cli_options import benchmark_parser
from byte_level_bpe import ByteLevelBPETokenizer
from checkpoints import load_model_and_tokenizer
from data_loader import collate_batch
from evaluator import GPTEvaluator
from gpt_model import GPTConfig, GPTModel
from loss_labels import IGNORE_INDEX
from prompts import SFT_TEMPLATE, prompt_response_ids, record_prompt_ids
from readers import load_sft_records
from training import TrainConfig, lr_at

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = {"sft": SFT_TEMPLATE, "bare": "{instruction}{response}"}  # bare: the shortest prompt, for comparison


def load_generator():
    """The SFT data generator (data/sft/build_sft_data.py)."""
    from data.sft import build_sft_data

    return build_sft_data


def training_records(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """(``n_sums`` distinct train sums, never a test sum; the other families' train records of data/sft)."""
    gen = load_generator()
    sums, _ = gen.arithmetic_examples(random.Random(args.data_seed), gen.Sizes(arithmetic_train=args.n_sums))
    others = [r for r in load_sft_records(args.train_data) if r["task"] != "arithmetic"]
    return gen.sft_records(sums), others


def build_model(args: argparse.Namespace) -> tuple[GPTModel, ByteLevelBPETokenizer]:
    if args.pretrained != "none":
        return load_model_and_tokenizer(args.pretrained, device="cpu", trainable=True)
    tokenizer = ByteLevelBPETokenizer.from_pretrained(args.tokenizer_dir)
    torch.manual_seed(args.seed)
    config = GPTConfig(vocab_size=len(tokenizer), d_model=args.d_model, n_layers=args.n_layers,
                       n_heads=args.n_heads or max(1, args.d_model // 32), d_ff=4 * args.d_model,
                       max_seq_len=args.max_seq_len, pad_token_id=tokenizer.pad_token_id)
    return GPTModel(config).train(), tokenizer


def encode(records: list[dict], tokenizer, template: str, model: GPTModel) -> list[dict[str, torch.Tensor]]:
    """``<s> prompt answer </s>`` samples with the prompt masked (-100), as data_loader.GPTSFTDataset builds them."""
    samples = []
    for r in records:
        sample = prompt_response_ids(tokenizer, record_prompt_ids(tokenizer, r, template), r["response"],
                                     model.config.max_seq_len)
        samples.append({"input_ids": torch.tensor(sample.input_ids), "labels": torch.tensor(sample.labels)})
    return samples


def answer_loss(model: GPTModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The masked SFT loss with lm_head applied only where a label exists (~3 of ~37 positions for a sum).

    Equal to ``model(input_ids, labels=labels)["loss"]``, which projects every position onto the vocabulary.
    """
    hidden = model._hidden_states(batch["input_ids"])  # right padding: causal attention is exact for real tokens
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    return F.cross_entropy(model.lm_head(hidden[:, :-1][keep]).float(), targets[keep])


def exact_match(model: GPTModel, tokenizer, records: list[dict], template: str) -> float:
    prompts = [record_prompt_ids(tokenizer, r, template) for r in records]
    predictions = GPTEvaluator(model, tokenizer, show_progress=False).generate_predictions(
        prompts, max_gen_len=6, do_sample=False, batch_size=len(prompts))
    return sum(p.strip() == r["response"].strip() for p, r in zip(predictions, records)) / len(records)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.num_threads)
    model, tokenizer = build_model(args)
    template = TEMPLATES[args.template]
    sums, others = training_records(args)
    arith_samples, other_samples = encode(sums, tokenizer, template, model), encode(others, tokenizer, template, model)
    test = [r for r in load_sft_records(args.test_data) if r["task"] == "arithmetic"]
    train_probe = sums[:200]  # seen sums: memorisation vs generalisation

    schedule = TrainConfig(lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup_steps=args.warmup_steps)
    optimizer = model.configure_optimizer(args.weight_decay, args.lr, (0.9, 0.95))
    rng = random.Random(args.seed)
    curve, tokens, start, step = [], 0, time.perf_counter(), 0
    deadline = start + 60 * args.max_minutes if args.max_minutes else float("inf")
    while step < args.max_steps and time.perf_counter() < deadline:
        chosen = [rng.choice(arith_samples if rng.random() < args.arith_fraction else other_samples)
                  for _ in range(args.batch_size)]
        batch = collate_batch(chosen, tokenizer.pad_token_id)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step / args.max_steps, step, schedule)
        if args.full_logits:
            loss = model(batch["input_ids"], labels=batch["labels"])["loss"]
        else:
            loss = answer_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += batch["input_ids"].numel()
        step += 1
        if step % args.eval_every == 0 or step == args.max_steps:
            train_seconds = time.perf_counter() - start
            curve.append({"step": step, "loss": round(loss.item(), 4),
                          "test_em": exact_match(model, tokenizer, test, template),
                          "train_em": exact_match(model, tokenizer, train_probe, template)})
            print(json.dumps(curve[-1]), file=sys.stderr)
            start += time.perf_counter() - start - train_seconds  # evaluation time does not count as training time
    elapsed = time.perf_counter() - start
    if not curve or curve[-1]["step"] != step:
        curve.append({"step": step, "loss": round(loss.item(), 4),
                      "test_em": exact_match(model, tokenizer, test, template),
                      "train_em": exact_match(model, tokenizer, train_probe, template)})
    n_labels = sum(int((s["labels"] != IGNORE_INDEX).sum()) for s in arith_samples)
    return {"settings": {k: v for k, v in vars(args).items() if k not in ("train_data", "test_data")},
            "params_M": round(model.num_parameters() / 1e6, 3),
            "mean_sum_tokens": round(sum(len(s["input_ids"]) for s in arith_samples) / len(arith_samples), 1),
            "mean_sum_answer_tokens": round(n_labels / len(arith_samples), 2), "steps": step, "tokens": tokens,
            "train_seconds": round(elapsed, 1), "steps_per_sec": round(step / elapsed, 2),
            "test_exact_match": curve[-1]["test_em"], "best_test_exact_match": max(c["test_em"] for c in curve),
            "curve": curve}


def build_parser() -> cli.ArgumentParser:
    p = benchmark_parser("benchmarks.calibrate_arithmetic", __doc__)
    p.add_argument("--pretrained", default="models/pretrain/pretrain_best.pth",
                   help="checkpoint to start from (tokenizer/ beside it), or 'none' for a random model of the "
                        "shape below")
    p.add_argument("--tokenizer_dir", default="models/bpe_tokenizer", help="tokenizer for --pretrained none")
    p.add_argument("--n_layers", type=cli.positive_int, default=2,
                   help="blocks of the random model (--pretrained none)")
    p.add_argument("--d_model", type=cli.positive_int, default=128,
                   help="width of the random model (--pretrained none)")
    p.add_argument("--n_heads", type=cli.positive_int, default=None,
                   help="heads of the random model (default d_model / 32)")
    p.add_argument("--max_seq_len", type=cli.int_at_least(2), default=64,
                   help="context of the random model (--pretrained none)")
    p.add_argument("--train_data", default=str(ROOT / "data/sft/sft_data.json"),
                   help="where the other families come from")
    p.add_argument("--test_data", default=str(ROOT / "data/sft/sft_test.json"), help="held-out sums (task arithmetic)")
    p.add_argument("--n_sums", type=cli.positive_int, default=2000,
                   help="distinct training sums (of the 9,500 not held out)")
    p.add_argument("--arith_fraction", type=cli.probability, default=1.0,
                   help="probability that a training sample is a sum (else another family)")
    p.add_argument("--template", choices=sorted(TEMPLATES), default="sft",
                   help="prompt format: the SFT template or bare")
    p.add_argument("--full_logits", action="store_true",
                   help="compute logits at every position (model(..., labels=...)) instead of only at answer tokens")
    p.add_argument("--batch_size", type=cli.positive_int, default=32, help="samples per step (drawn with replacement)")
    p.add_argument("--lr", type=cli.positive_float, default=3e-3, help="peak learning rate")
    p.add_argument("--min_lr_ratio", type=cli.unit_interval, default=0.1,
                   help="cosine decays to lr * this at --max_steps")
    p.add_argument("--warmup_steps", type=cli.nonnegative_int, default=50, help="linear warmup steps")
    p.add_argument("--weight_decay", type=cli.nonnegative_float, default=0.1, help="AdamW weight decay on 2-D weights")
    p.add_argument("--max_steps", type=cli.positive_int, default=1500, help="optimizer steps (the cosine ends here)")
    p.add_argument("--max_minutes", type=cli.positive_float, default=None,
                   help="also stop after this much training time")
    p.add_argument("--eval_every", type=cli.positive_int, default=250, help="held-out exact match every N steps")
    p.add_argument("--num_threads", type=cli.positive_int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=cli.nonnegative_int, default=0, help="seed of the model init and batch order")
    p.add_argument("--data_seed", type=cli.nonnegative_int, default=0,
                   help="seed of data/sft's split (0 = the committed files)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """The calibration run; a bad flag gives one `error:` line and exit 2 (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    print(json.dumps(run(parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
