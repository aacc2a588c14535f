"""Does every finetuning stage improve a held-out metric? Runs the user's commands with their defaults and measures.

    pretrained (models/pretrain/pretrain_best.pth, trained first with `python pretrain_trainer.py` if missing)
      -> python finetune.py --mode sft      exact match per task family on data/sft/sft_test.json (greedy)
      -> python finetune.py --mode reward   pairwise accuracy on data/sft/rlhf_pairwise_test.json
      -> python finetune.py --mode rlhf     per seed: mean reward-model score of greedy held-out responses, exact KL to
                                            the SFT model, exact match; the SFT model measured the same way

Prints ONE JSON line. Each stage runs in its own process exactly as a user would start it (default settings, about
5 minutes each on 2 CPU cores), so the whole benchmark takes ~25 minutes with 3 PPO seeds.

    python -m benchmarks.bench_finetune [--workdir models/bench_finetune] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import finetune
import gpt_model

ROOT = Path(__file__).resolve().parent.parent
TEST = ROOT / "data" / "sft" / "sft_test.json"
PAIRS_TEST = ROOT / "data" / "sft" / "rlhf_pairwise_test.json"


def run(args: list[str]) -> float:
    """Run one CLI command from the project root; returns its wall seconds (fails loudly)."""
    start = time.time()
    print("$ python " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return round(time.time() - start, 1)


def exact_match(checkpoint: Path) -> dict[str, float]:
    report = finetune.exact_match_report(checkpoint, str(TEST))
    return {k: round(v, 4) for k, v in report.items()}


def policy_figures(policy_path: Path, sft_path: Path, reward_path: Path) -> dict[str, float]:
    """Held-out greedy responses of a policy: reward score, exact KL to the SFT model, exact match (all records)."""
    policy, tokenizer = gpt_model.load_model_and_tokenizer(policy_path)
    reference, _ = gpt_model.load_model_and_tokenizer(sft_path)
    reward, _ = gpt_model.load_model_and_tokenizer(reward_path)
    template = gpt_model.checkpoint_metadata(sft_path).get("sft_template")
    records = json.loads(TEST.read_text(encoding="utf-8"))
    figures = finetune.evaluate_policy(policy, reference, reward, tokenizer, records, template, 16, torch.device("cpu"))
    return {k.removeprefix("val_"): round(v, 4) for k, v in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", default="models/pretrain/pretrain_best.pth",
                        help="the pretrained model (trained with the default `python pretrain_trainer.py` if missing)")
    parser.add_argument("--workdir", default="models/bench_finetune", help="where each stage writes its outputs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="PPO seeds")
    args = parser.parse_args()
    work = ROOT / args.workdir
    pretrained = ROOT / args.pretrained
    out: dict = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if not pretrained.exists():
        out["pretrain_seconds"] = run(["pretrain_trainer.py", "--samples", "0"])
    out["pretrained_exact_match"] = exact_match(pretrained)

    sft = work / "sft" / "sft_best.pth"
    out["sft_seconds"] = run(["finetune.py", "--mode", "sft", "--pretrained_model", str(pretrained),
                              "--output_dir", str(sft.parent)])
    out["sft_exact_match"] = exact_match(sft)

    reward = work / "reward" / "reward_best.pth"
    out["reward_seconds"] = run(["finetune.py", "--mode", "reward", "--sft_model", str(sft),
                                 "--output_dir", str(reward.parent)])
    model, tokenizer = gpt_model.load_model_and_tokenizer(reward)
    import evaluator

    template = gpt_model.checkpoint_metadata(reward).get("sft_template")
    report = evaluator.GPTEvaluator(model, tokenizer, show_progress=False, template=template).evaluate_reward(PAIRS_TEST)
    out["reward_pairwise_accuracy"] = round(report["pairwise_accuracy"], 4)
    out["reward_mean_margin"] = round(report["mean_margin"], 4)

    out["sft_policy"] = policy_figures(sft, sft, reward)
    for seed in args.seeds:
        ppo = work / f"rlhf_seed{seed}" / "ppo_best.pth"
        seconds = run(["finetune.py", "--mode", "rlhf", "--sft_model", str(sft), "--reward_model", str(reward),
                       "--output_dir", str(ppo.parent), "--seed", str(seed)])
        out[f"ppo_seed{seed}"] = {"seconds": seconds, **policy_figures(ppo, sft, reward)}
    seeds = [out[f"ppo_seed{s}"] for s in args.seeds]
    for key in ("reward", "kl", "exact_match"):
        values = [s[key] for s in seeds]
        out[f"ppo_{key}_min_max"] = [min(values), max(values)]
    print(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    main()
