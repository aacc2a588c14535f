"""Does every finetuning stage improve a held-out metric? Runs the user's commands with their defaults and measures.

    pretrained (models/pretrain/pretrain_best.pth, trained first with `python pretrain_trainer.py` if missing)
      -> python finetune.py --mode sft      exact match per task family on data/sft/sft_test.json (greedy)
      -> python finetune.py --mode reward   pairwise accuracy on data/sft/rlhf_pairwise_test.json; the baseline:
                                            pairs ranked by the SFT model's mean answer log-prob, no training
      -> python finetune.py --mode rlhf     per seed: mean reward-model score of greedy held-out responses, exact KL to
                                            the SFT model, exact match (and the evaluator's per family); the SFT model
                                            measured the same way
      -> python finetune.py --mode dpo      held-out implicit-reward preference accuracy, exact match
      -> python finetune.py --mode rlvf     per seed: arithmetic exact match (GRPO with verifiers)
      -> best-of-8 with the reward model    per sampling seed: arithmetic exact match, against greedy SFT; with the
                                            verifiers (pass@8)
      -> rlvf_headroom                      the same GRPO (per seed) and best-of-8 from an SFT model stopped at
                                            2,500 steps (--max_steps 2500), whose arithmetic has room to improve

Prints ONE JSON line. Each stage runs in its own process exactly as a user would start it (default settings, a few
minutes each on 2 CPU cores). ``--reuse`` keeps a stage's existing output in --workdir instead of training it again
(for finishing an interrupted benchmark; the figures are still measured).

    python -m benchmarks.bench_finetune [--workdir models/bench_finetune] [--seeds 0 1 2] [--stages sft reward ...]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import checkpoints
import cli
import finetune_stages
import rl_step
import scoring
from benchmarks.cli_options import benchmark_parser
from decoding import SamplingParams
from prompts import record_prompt_ids

ROOT = Path(__file__).resolve().parent.parent
TEST = ROOT / "data" / "sft" / "sft_test.json"
PAIRS_TEST = ROOT / "data" / "sft" / "rlhf_pairwise_test.json"


def run(args: list[str]) -> float:
    """Run one CLI command from the project root; returns its wall seconds (fails loudly)."""
    start = time.time()
    print("$ python " + " ".join(args), file=sys.stderr, flush=True)
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return round(time.time() - start, 1)


def exact_match(checkpoint: Path, test: Path = TEST) -> dict[str, float]:
    report = finetune_stages.exact_match_report(checkpoint, str(test))
    return {k: round(v, 4) for k, v in report.items()}


def policy_figures(policy_path: Path, sft_path: Path, reward_path: Path) -> dict[str, float]:
    """Held-out greedy responses of a policy: reward score, exact KL to the SFT model, exact match (all records)."""
    policy, tokenizer = checkpoints.load_model_and_tokenizer(policy_path)
    sft = checkpoints.load(sft_path)
    reference, template = sft.model, sft.template
    reward, _ = checkpoints.load_model_and_tokenizer(reward_path)
    records = json.loads(TEST.read_text(encoding="utf-8"))
    figures = rl_step.evaluate_policy(policy, reference, reward, tokenizer, records, template, 16)
    return {k.removeprefix("val_"): round(v, 4) for k, v in figures.items()}


def train(args: argparse.Namespace, output: Path, command: list[str]) -> float | None:
    """Run a stage unless --reuse and its output exists; its wall seconds (None when reused)."""
    if args.reuse and output.exists():
        return None
    return run(command)


STAGES = ("sft", "reward", "ppo", "dpo", "rlvf", "best_of", "rlvf_headroom")


def build_parser() -> cli.ArgumentParser:
    parser = benchmark_parser("benchmarks.bench_finetune", __doc__)
    parser.add_argument("--pretrained", default="models/pretrain/pretrain_best.pth",
                        help="the pretrained model (trained with the default `python pretrain_trainer.py` if missing)")
    parser.add_argument("--workdir", default="models/bench_finetune", help="where each stage writes its outputs")
    parser.add_argument("--seeds", type=cli.nonnegative_int, nargs="+", default=[0, 1, 2],
                        help="seeds of the PPO and GRPO runs and of best-of-8's sampling")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                        help="which stages to run (sft and reward are needed by the others)")
    parser.add_argument("--reuse", action="store_true", help="keep stage outputs already in --workdir")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The benchmark; a bad flag gives one `error:` line and exit 2 (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    work = ROOT / args.workdir
    pretrained = ROOT / args.pretrained
    out: dict = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if not pretrained.exists():
        out["pretrain_seconds"] = run(["pretrain_trainer.py", "--samples", "0"])
    out["pretrained_exact_match"] = exact_match(pretrained)

    sft = work / "sft" / "sft_best.pth"
    out["sft_seconds"] = train(args, sft, ["finetune.py", "--mode", "sft", "--pretrained_model", str(pretrained),
                                           "--output_dir", str(sft.parent)])
    out["sft_exact_match"] = exact_match(sft)

    reward = work / "reward" / "reward_best.pth"
    out["reward_seconds"] = train(args, reward, ["finetune.py", "--mode", "reward", "--sft_model", str(sft),
                                                 "--output_dir", str(reward.parent)])
    import evaluator

    loaded = checkpoints.load(reward)
    model, tokenizer, template = loaded.model, loaded.tokenizer, loaded.template
    scorer = evaluator.GPTEvaluator(model, tokenizer, show_progress=False, template=template)
    report = scorer.evaluate_reward(PAIRS_TEST)
    out["reward_pairwise_accuracy"] = round(report["pairwise_accuracy"], 4)
    out["reward_pairwise_accuracy_by_task"] = {key.split("/", 1)[1]: round(value, 4) for key, value in report.items()
                                               if key.startswith("pairwise_accuracy/")}
    out["reward_mean_margin"] = round(report["mean_margin"], 4)
    out["sft_likelihood_pairwise_accuracy"] = likelihood_accuracy(sft)
    out["sft_policy"] = policy_figures(sft, sft, reward)

    if "ppo" in args.stages:
        for seed in args.seeds:
            ppo = work / f"rlhf_seed{seed}" / "ppo_best.pth"
            seconds = train(args, ppo, ["finetune.py", "--mode", "rlhf", "--sft_model", str(sft), "--reward_model",
                                        str(reward), "--output_dir", str(ppo.parent), "--seed", str(seed)])
            out[f"ppo_seed{seed}"] = {"seconds": seconds, **policy_figures(ppo, sft, reward),
                                      "by_family": exact_match(ppo)}
        spread(out, "ppo", args.seeds, ("reward", "kl", "exact_match"))
    if "dpo" in args.stages:
        dpo = work / "dpo" / "dpo_best.pth"
        out["dpo_seconds"] = train(args, dpo, ["finetune.py", "--mode", "dpo", "--sft_model", str(sft),
                                               "--output_dir", str(dpo.parent)])
        out["dpo_preference_accuracy"] = round(dpo_accuracy(dpo, sft), 4)
        out["dpo_exact_match"] = exact_match(dpo)
    if "rlvf" in args.stages:
        rlvf_seeds(args, out, work, sft, "rlvf")
    if "best_of" in args.stages:
        best_of_seeds(args, out, "best_of_8", sft, reward)
        best_of_seeds(args, out, "best_of_8_verifier", sft, None)
    if "rlvf_headroom" in args.stages:
        early = work / "sft_2500" / "sft_best.pth"
        train(args, early, ["finetune.py", "--mode", "sft", "--pretrained_model", str(pretrained), "--output_dir",
                            str(early.parent), "--max_steps", "2500"])
        out["sft_2500_exact_match"] = exact_match(early)
        rlvf_seeds(args, out, work, early, "rlvf_from_sft_2500")
        best_of_seeds(args, out, "best_of_8_from_sft_2500", early, reward)
        best_of_seeds(args, out, "best_of_8_verifier_from_sft_2500", early, None)
    print(json.dumps(out, ensure_ascii=False))
    return 0


def rlvf_seeds(args: argparse.Namespace, out: dict, work: Path, sft: Path, stage: str) -> None:
    """GRPO from ``sft`` once per seed: exact match of each run, and the spread over seeds."""
    for seed in args.seeds:
        rlvf = work / f"{stage}_seed{seed}" / "rlvf_best.pth"
        seconds = train(args, rlvf, ["finetune.py", "--mode", "rlvf", "--sft_model", str(sft), "--output_dir",
                                     str(rlvf.parent), "--seed", str(seed)])
        out[f"{stage}_seed{seed}"] = {"seconds": seconds, **exact_match(rlvf)}
    spread(out, stage, args.seeds, ("exact_match/arithmetic", "exact_match"))


def best_of_seeds(args: argparse.Namespace, out: dict, stage: str, sft: Path, reward: Path | None) -> None:
    """Best-of-8 once per sampling seed, and the spread over seeds."""
    for seed in args.seeds:
        out[f"{stage}_seed{seed}"] = best_of_n(sft, reward, 8, seed)
    spread(out, stage, args.seeds, ("exact_match/arithmetic", "exact_match"))


def spread(out: dict, stage: str, seeds: list[int], keys: tuple[str, ...]) -> None:
    """[min, max] over seeds of each key: the spread a claimed improvement must exceed."""
    for key in keys:
        values = [out[f"{stage}_seed{s}"][key] for s in seeds]
        out[f"{stage}_{key}_min_max"] = [min(values), max(values)]


def answer_logprobs(checkpoint: Path, average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probs of every held-out pair's answer under a language model (summed, or per token)."""
    import data_loader
    import metrics

    loaded = checkpoints.load(checkpoint)
    model, tokenizer, template = loaded.model, loaded.tokenizer, loaded.template
    pairs = data_loader.PreferencePairDataset(str(PAIRS_TEST), tokenizer, model.config.max_seq_len, template)
    rows = []
    with torch.no_grad():
        for start in range(0, len(pairs), 64):
            batch = data_loader.collate_pairs([pairs[i] for i in range(start, min(start + 64, len(pairs)))],
                                              tokenizer.pad_token_id)
            logprobs = metrics.scored_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                               average)
            rows.append(torch.stack(logprobs.chunk(2), 1))
    chosen, rejected = torch.cat(rows).unbind(1)
    return chosen, rejected


def dpo_accuracy(dpo: Path, sft: Path) -> float:
    """Held-out implicit-reward accuracy: β·(log π − log π_ref) of the chosen answer above the rejected one's."""
    (policy_chosen, policy_rejected), (ref_chosen, ref_rejected) = answer_logprobs(dpo), answer_logprobs(sft)
    return float(((policy_chosen - ref_chosen) > (policy_rejected - ref_rejected)).float().mean())


def likelihood_accuracy(sft: Path) -> dict[str, float]:
    """The untrained baseline a reward model should beat: pairs ranked by the SFT model's mean answer log-prob."""
    chosen, rejected = answer_logprobs(sft, average=True)
    tasks = [r["task"] for r in json.loads(PAIRS_TEST.read_text(encoding="utf-8"))]
    wins = (chosen > rejected).tolist()
    out = {"all": round(sum(wins) / len(wins), 4)}
    for task in sorted(set(tasks)):
        picked = [w for w, t in zip(wins, tasks) if t == task]
        out[task] = round(sum(picked) / len(picked), 4)
    return out


def best_of_n(sft: Path, reward: Path | None, n: int, seed: int) -> dict[str, float]:
    """Exact match of the pick among n samples (temperature 0.8, top-k 50) per held-out prompt: the reward model's
    pick, or with ``reward=None`` the records' verifiers' (pass@n)."""
    import evaluator

    loaded = checkpoints.load(sft)
    model, tokenizer, template = loaded.model, loaded.tokenizer, loaded.template
    reward_model = checkpoints.load(reward).model if reward else None
    ev = evaluator.GPTEvaluator(model, tokenizer, show_progress=False, template=template)
    records = json.loads(TEST.read_text(encoding="utf-8"))
    prompts = [record_prompt_ids(tokenizer, r, template) for r in records]
    sampling = SamplingParams(max_new_tokens=16, temperature=0.8, top_k=50)
    picks = ev.best_of_n_predictions(prompts, n, reward_model, sampling, seed=seed, min_new_tokens=1, records=records)
    return {k: round(v, 4) for k, v in scoring.exact_match_by_task(picks, records).items()}


if __name__ == "__main__":
    sys.exit(main())
