"""Behaviour unchanged by a refactor, measured: every finetuning stage run by this tree and by an earlier commit on the
same tiny pretrained model and data, compared value by value (every logged metric of every step and evaluation, the
summary the command prints, and the weights of the best and the last step checkpoint, PPO's critic included).

    python -m benchmarks.bench_equivalence --against 45b0f70        # ~2 minutes on 2 cores

The earlier commit is checked out with `git worktree` into a temporary folder (removed afterwards); both trees run
`finetune.py` as a user would, one thread each, with the same flags (valid in both). Prints ONE JSON line:
{"against", "stages": {stage: "identical" | [differences]}, "seconds"}.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import cli
from benchmarks.cli_options import benchmark_parser
from byte_level_bpe import ByteLevelBPETokenizer
from checkpoints import save_checkpoint
from gpt_model import GPTConfig, GPTModel

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("sft", "reward", "rlhf", "dpo", "rlvf", "classify")
TIMING = {"tokens_per_sec", "mfu", "train_loss"}  # train_loss: RL logs it only since the one loop


def setup(folder: Path) -> None:
    """A tiny pretrained model (context 128), its tokenizer and slices of the demo data, in ``folder``."""
    data = ROOT / "data"
    lines = (data / "pretrain" / "train.txt").read_text(encoding="utf-8").splitlines()[:3000]
    tokenizer = ByteLevelBPETokenizer(vocab_size=600)
    tokenizer.train(lines, show_progress=False)
    tokenizer.save(folder / "pre" / "tokenizer")
    torch.manual_seed(0)
    config = GPTConfig.from_preset("tiny", vocab_size=len(tokenizer), max_seq_len=128, n_layers=2, d_model=64,
                                   n_heads=2)
    save_checkpoint(folder / "pre" / "pretrain_best.pth", GPTModel(config), tokenizer_fingerprint=tokenizer.fingerprint)
    for name, n in (("sft_data", 200), ("sft_test", 40), ("rlhf_pairwise", 200), ("rlhf_pairwise_test", 40)):
        records = json.loads((data / "sft" / f"{name}.json").read_text(encoding="utf-8"))[:n]
        (folder / f"{name}.json").write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    for name, n in (("train", 120), ("test", 40)):
        rows = (data / "classify" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()[:n]
        (folder / f"classify_{name}.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")


def commands(data: Path, out: Path) -> dict[str, list[str]]:
    """Each stage's flags: short runs, every stage reading the previous one's output."""
    sft, reward, pre = out / "sft" / "sft_best.pth", out / "reward" / "reward_best.pth", data / "pre/pretrain_best.pth"
    rollouts = ["--eval_samples", "16", "--max_new_tokens", "8", "--test_data_path", str(data / "sft_test.json")]
    pairs = ["--pairwise_data", str(data / "rlhf_pairwise.json")]
    return {
        "sft": ["--pretrained_model", str(pre), "--data_path", str(data / "sft_data.json"), "--test_data_path",
                str(data / "sft_test.json"), "--max_steps", "6", "--eval_interval", "3", "--batch_size", "8"],
        "reward": ["--sft_model", str(sft), *pairs, "--pairwise_test_data", str(data / "rlhf_pairwise_test.json"),
                   "--max_steps", "4", "--eval_interval", "2", "--batch_size", "8"],
        "rlhf": ["--sft_model", str(sft), "--reward_model", str(reward), *pairs, *rollouts, "--max_steps", "3",
                 "--eval_interval", "2", "--rollout_batch_size", "8", "--ppo_minibatch_size", "4", "--ppo_epochs", "2"],
        "dpo": ["--sft_model", str(sft), *pairs, "--pairwise_test_data", str(data / "rlhf_pairwise_test.json"),
                "--max_steps", "3", "--eval_interval", "3", "--batch_size", "8"],
        "rlvf": ["--sft_model", str(sft), "--data_path", str(data / "sft_data.json"), *rollouts, "--max_steps", "3",
                 "--eval_interval", "2", "--rollout_batch_size", "4", "--group_size", "4", "--ppo_minibatch_size", "8"],
        "classify": ["--pretrained_model", str(pre), "--classify_train", str(data / "classify_train.jsonl"),
                     "--classify_test", str(data / "classify_test.jsonl"), "--max_steps", "4", "--eval_interval",
                     "2", "--batch_size", "8"],
    }


def digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].float().numpy().tobytes())
    return h.hexdigest()[:16]


def outcome(folder: Path, stdout: str) -> dict:
    """What a stage produced: its metrics (timing dropped), its summary line, and digests of its weights."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    last = max(folder.glob("*_step_*.pth"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    checkpoint = torch.load(last, weights_only=True)
    critic = checkpoint.get("critic") or checkpoint.get("step_state", {}).get("critic")
    summary = json.loads(stdout.strip().splitlines()[-1])
    summary.pop("checkpoint", None)
    return {"rows": [{k: v for k, v in r.items() if k not in TIMING} for r in rows], "summary": summary,
            "best": digest(torch.load(next(folder.glob("*_best.pth")), weights_only=True)["model_state_dict"]),
            "last": digest(checkpoint["model_state_dict"]), "critic": digest(critic) if critic else None}


def run_tree(tree: Path, data: Path, out: Path, stages: list[str]) -> dict[str, dict]:
    results = {}
    for stage, flags in commands(data, out).items():
        if stage not in stages:
            continue
        argv = [sys.executable, "finetune.py", "--mode", stage, *flags, "--output_dir", str(out / stage), "--device",
                "cpu", "--num_threads", "1", "--seed", "0"]
        proc = subprocess.run(argv, cwd=tree, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"})
        if proc.returncode:
            raise cli.UsageError(f"{stage} failed in {tree}: {proc.stderr.strip().splitlines()[-1]}")
        results[stage] = outcome(out / stage, proc.stdout)
    return results


def differences(before: dict, after: dict) -> list[str]:
    found = [f"{key} differs" for key in ("summary", "best", "last", "critic") if before[key] != after[key]]
    found += [f"row {i}: {a} vs {b}" for i, (a, b) in enumerate(zip(before["rows"], after["rows"])) if a != b][:5]
    if len(before["rows"]) != len(after["rows"]):
        found.append(f"{len(before['rows'])} rows vs {len(after['rows'])}")
    return found


def build_parser() -> cli.ArgumentParser:
    parser = benchmark_parser("benchmarks.bench_equivalence", __doc__)
    parser.add_argument("--against", default="45b0f70", help="the earlier commit (or any git revision) to compare with")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to compare")
    return parser


def main(argv: list[str] | None = None) -> int:
    """The benchmark; a bad flag gives one `error:` line and exit 2 (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        setup(tmp / "data")
        old = tmp / "old"
        subprocess.run(["git", "worktree", "add", "--detach", str(old), args.against], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            before = run_tree(old, tmp / "data", tmp / "out_old", args.stages)
            after = run_tree(ROOT, tmp / "data", tmp / "out_new", args.stages)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, capture_output=True)
    stages = {stage: differences(before[stage], after[stage]) or "identical" for stage in args.stages}
    print(json.dumps({"against": args.against, "stages": stages, "seconds": round(time.perf_counter() - started, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
