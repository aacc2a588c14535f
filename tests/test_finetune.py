"""finetune.py, the CLI: one parser for every mode, a mode's own defaults, foreign flags and bad input as one line."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

import checkpoints
import finetune as ft
import finetune_stages as stages
import gpt_model
from conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")


def sft_args(files, tmp_path) -> list[str]:
    return ["--pretrained_model", str(files["pretrained"]), "--data_path", str(files["sft_data"]),
            "--test_data_path", str(files["sft_test"]), "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
            "--device", "cpu"]


def one_line_error(argv: list[str], capsys) -> str:
    assert ft.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
    return err


def test_bad_data_and_paths_are_one_line_and_write_nothing(files, tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    no_field = tmp_path / "no_field.json"
    no_field.write_text(json.dumps([{"instruction": "x"}]))
    out = ["--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--device", "cpu"]
    cases = {
        "run `python pretrain_trainer.py` first": ["--pretrained_model", str(tmp_path / "missing.pth")],
        "holds no records": ["--data_path", str(empty)],
        "missing or non-string field 'response'": ["--data_path", str(no_field)],
        "match no nn.Linear": ["--lora_r", "4", "--lora_targets", "q_proj"],
    }
    for expected, extra in cases.items():
        assert expected in one_line_error(sft_args(files, tmp_path) + extra, capsys)
    missing_sft = ["--mode", "reward", "--sft_model", str(tmp_path / "none.pth"), *out]
    assert "run `python finetune.py --mode sft` first" in one_line_error(missing_sft, capsys)
    reward_as_sft = ["--mode", "dpo", "--sft_model", str(files["pretrained"]), "--pairwise_data", str(empty), *out]
    assert "holds no records" in one_line_error(reward_as_sft, capsys)
    other = gpt_model.GPTModel(gpt_model.GPTConfig.from_preset("tiny", vocab_size=300, max_seq_len=64, n_layers=1,
                                                               d_model=32, n_heads=2))
    checkpoints.save_checkpoint(tmp_path / "other" / "m.pth", other, tokenizer_fingerprint="another tokenizer")
    shutil.copytree(files["pretrained"].parent / "tokenizer", tmp_path / "other" / "tokenizer")
    err = one_line_error(sft_args(files, tmp_path) + ["--pretrained_model", str(tmp_path / "other" / "m.pth")], capsys)
    assert "has 512 tokens but the model only 300" in err
    assert not (tmp_path / "out").exists()  # nothing was written by any rejected run


BAD_FLAGS = [
    (["--mode", "grpo"], "invalid choice"), (["--mode", "dpo", "--dpo_loss", "hinge"], "invalid choice"),
    (["--mode", "rlvf", "--group_size", "1"], "must be >= 2"), (["--lora_r", "-1"], "must be >= 0"),
    (["--mode", "rlhf", "--kl_coef", "-1"], "must be >= 0"), (["--mode", "rlhf", "--lam", "0"], "(0, 1]"),
    (["--max_seq_len", "1"], "must be >= 2"), (["--mode", "dpo", "--max_seq_len", "128"], "--mode sft only"),
    (["--batch_size", "0"], "must be >= 1"), (["--lr", "nan"], "finite"), (["--max_steps", "x"], "an integer"),
    (["--no_such_flag"], "unrecognized"), (["--min_lr_ratio", "1.5"], "[0, 1]"), (["--keep_last", "-1"], ">= 0"),
    # a flag of another mode is an error, not silently ignored
    (["--mode", "reward", "--lora_r", "4"], "--lora_r applies to --mode sft only, not --mode reward"),
    (["--kl_coef", "0.1"], "--kl_coef applies to --mode rlhf / rlvf only, not --mode sft"),
    (["--mode", "dpo", "--dropout", "0.1"], "--dropout applies to --mode sft / classify only"),
    (["--mode", "classify", "--group_size", "4"], "--group_size applies to --mode rlvf only"),
    (["--mode", "rlvf", "--reward_model", "r.pth"], "--reward_model applies to --mode rlhf only"),
    (["--optimizer", "lion"], "invalid choice"), (["--lora_r", "4", "--optimizer", "muon"], "use --optimizer adamw"),
    # the held-out share of the user's own --data_path
    (["--val_fraction", "0"], "must be in (0, 1)"), (["--val_fraction", "1"], "must be in (0, 1)"),
    (["--val_fraction", "x"], "expected a number"), (["--val_fraction", "0.1"], "pass --data_path"),
    (["--data_path", "a.json", "--test_data_path", "b.json", "--val_fraction", "0.1"], "and no --test_data_path"),
    (["--mode", "dpo", "--val_fraction", "0.1"], "--val_fraction applies to --mode sft / rlvf only"),
    # the output folder never holds what the run starts from (SFT into models/pretrain moved its tokenizer aside)
    (["--pretrained_model", "{out}/pretrain_best.pth"], "--output_dir {out} would replace --pretrained_model"),
    (["--mode", "dpo", "--sft_model", "{out}/sub/sft_best.pth"], "would replace --sft_model"),
    (["--mode", "rlhf", "--reward_model", "{out}/reward_best.pth"], "would replace --reward_model"),
    (["--tokenizer_dir", "{out}/tokenizer"], "would replace --tokenizer_dir"),
    # rlhf's own reward model (trained first into <output_dir>/reward/) may be passed back: the next check speaks
    (["--mode", "rlhf", "--sft_model", "{out}/../sft.pth", "--reward_model", "{out}/reward/reward_best.pth"],
     "{out}/../sft.pth does not exist"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=lambda f: " ".join(f) if isinstance(f, list) else "")
def test_bad_flags_are_one_line(flags, message, tmp_path, capsys):
    out = str(tmp_path / "out")
    argv = [*(f.replace("{out}", out) for f in flags), "--output_dir", out, "--device", "cpu"]
    assert message.replace("{out}", out) in one_line_error(argv, capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags", [
    ["--pretrained_model", "{adapter}", "--output_dir", "{base_folder}"],
    ["--pretrained_model", "{adapter}", "--output_dir", "{base_folder}/tokenizer"],
    ["--mode", "classify", "--pretrained_model", "{adapter}", "--output_dir", "{base_folder}"],
    ["--mode", "reward", "--sft_model", "{adapter}", "--output_dir", "{base_folder}"],
    ["--mode", "dpo", "--sft_model", "{adapter}", "--output_dir", "{base_folder}"],
], ids=lambda flags: " ".join(flags))
def test_the_output_folder_never_holds_the_base_model_of_an_adapter_it_starts_from(flags, tiny_tokenizer, tmp_path,
                                                                                    capsys):
    """A run takes its output folder over (a different tokenizer moves to previous/): into the folder of a LoRA
    adapter's base model it would leave the adapter pointing at a model without its tokenizer."""
    from cli_cases import snapshot
    from conftest import lora_adapter

    base, adapter = lora_adapter(tmp_path / "sft" / "adapters.pth", tmp_path / "pre" / "base.pth", tiny_tokenizer)
    before = snapshot(tmp_path)
    argv = [f.format(adapter=adapter, base_folder=base.parent) for f in flags] + ["--device", "cpu", "--max_steps", "1"]
    assert "the base model of --" in one_line_error(argv, capsys)
    assert snapshot(tmp_path) == before


def test_help_lists_every_modes_flags_with_their_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ft.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    for dest in ft.mode_settings():
        assert f"--{dest}" in out
    assert "--mode rlvf:" in out and "default: sft 0.003, reward 0.001, rlhf 1e-05" in " ".join(out.split())


def test_a_modes_config_holds_its_defaults_and_what_the_user_typed():
    _, config = ft.parse(["--mode", "dpo", "--dpo_beta", "0.3", "--max_minutes", "2"])
    assert isinstance(config, stages.DPOConfig) and config.dpo_beta == 0.3 and config.lr == stages.DPOConfig().lr
    assert config.max_minutes == 2 and config.max_steps is None  # a time budget replaces the default step count
    _, config = ft.parse(["--mode", "rlvf", "--epochs", "1", "--max_steps", "7"])
    assert (config.epochs, config.max_steps) == (1, 7)


def test_only_rank_0_writes_the_exact_match_report(monkeypatch, capsys):
    """Under torchrun every rank runs the stage; the report after it is rank 0's alone (it ran on every rank: a fresh
    DistInfo() was always rank 0)."""
    reports = []
    monkeypatch.setitem(ft.RUNS, "sft", lambda config, resume: {"stage": "sft", "checkpoint": "x.pth"})
    monkeypatch.setattr(ft, "exact_match_report", lambda *args, **kwargs: reports.append(args) or {"exact_match": 1})
    for rank, expected in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        assert ft.main(["--mode", "sft"]) == 0
        assert len(reports) == expected
    assert '"exact_match": {"exact_match": 1}' in capsys.readouterr().out


def test_the_docs_list_each_modes_defaults():
    """docs/finetuning.md's table of stage defaults is what the configs hold."""
    rows = {line.split("|")[1].strip(" `"): [c.strip() for c in line.split("|")[2:-1]]
            for line in (ROOT / "docs" / "finetuning.md").read_text(encoding="utf-8").splitlines()
            if line.startswith("| `") and line.split("|")[1].strip(" `") in stages.CONFIGS}
    assert set(rows) == set(stages.CONFIGS)
    for mode, config in stages.CONFIGS.items():
        defaults = config()
        output_dir, lr, warmup, max_steps, interval = rows[mode][:5]
        assert output_dir.strip("`") == defaults.output_dir and float(lr) == defaults.lr, mode
        assert (int(warmup), int(max_steps.replace(",", "")), int(interval)) == (
            defaults.warmup_steps, defaults.max_steps, defaults.eval_interval), mode


# ----------------------------------------------------------------------------- the user's own data, held out

def write_mine(path, n: int = 40) -> list[dict]:
    """A user's chat file: two task families of their own, none of the demo's."""
    records = [{"instruction": f"colour of item {i}?", "response": f"c{i % 7}", "task": "colours"} if i % 2 else
               {"instruction": f"price of item {i}?", "response": f"{i}", "task": "prices"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return records


def summary_of(out: str) -> dict:
    return json.loads(next(line for line in out.splitlines() if line.startswith("{")))


def test_sft_on_your_own_file_is_judged_on_a_held_out_split_of_it(files, tmp_path, capsys):
    mine = tmp_path / "mine.jsonl"
    records = write_mine(mine)
    argv = ["--pretrained_model", str(files["pretrained"]), "--data_path", str(mine), "--output_dir",
            str(tmp_path / "out"), "--max_steps", "2", "--eval_interval", "2", "--batch_size", "4", "--device", "cpu",
            "--val_fraction", "0.25"]
    assert ft.main(argv) == 0
    out = capsys.readouterr().out
    summary = summary_of(out)
    assert summary["held_out"] == f"held out 10 of 40 records of {mine} for evaluation"
    assert "sft: 30 train / 10 held-out examples" in out
    tasks = {key.split("/")[1] for key in summary["exact_match"] if "/" in key}
    assert tasks and tasks <= {"colours", "prices"}  # the families come from the user's data, not the demo's

    _, config = ft.parse(argv)
    assert config.test_data_path is None  # nothing typed: the user's data is split, the demo test set is not used
    train, held, note = stages.held_out_split(config)
    assert note == summary["held_out"]
    instructions = lambda rows: {r["instruction"] for r in rows}  # noqa: E731
    assert not instructions(train) & instructions(held) and len(train) + len(held) == len(records)
    assert instructions(train) | instructions(held) == instructions(records)
    assert stages.held_out_split(config) == (train, held, note)  # deterministic
    other = stages.held_out_split(dataclasses.replace(config, seed=config.seed + 1))
    assert instructions(other[1]) != instructions(held)  # chosen by --seed
    default = stages.held_out_split(ft.parse(["--data_path", str(mine)])[1])  # --val_fraction 0.05 of 40
    assert len(default[1]) == 2 and default[2].startswith("held out 2 of 40 records")


def test_sft_with_a_test_file_evaluates_on_it_as_before(files, tmp_path, capsys):
    assert ft.main(sft_args(files, tmp_path)) == 0
    out = capsys.readouterr().out
    summary = summary_of(out)
    assert "held_out" not in summary and "held out" not in out  # the test file, as given
    assert {key.split("/")[1] for key in summary["exact_match"] if "/" in key} <= {
        r["task"] for r in json.loads(files["sft_test"].read_text(encoding="utf-8"))}
    _, config = ft.parse(sft_args(files, tmp_path))
    train, held, note = stages.held_out_split(config)
    assert note is None and len(train) == 48 and held == json.loads(files["sft_test"].read_text(encoding="utf-8"))


def test_the_held_out_split_has_a_floor_a_cap_and_the_demo_keeps_its_test_set(tmp_path, capsys):
    assert ft.parse([])[1].test_data_path == "data/sft/sft_test.json"  # the demo: exactly as before
    assert ft.parse(["--mode", "rlvf"])[1].test_data_path == "data/sft/sft_test.json"
    mine = tmp_path / "mine.jsonl"
    write_mine(mine, 3)
    rlvf = ft.parse(["--mode", "rlvf", "--data_path", str(mine), "--val_fraction", "0.01"])[1]
    assert rlvf.test_data_path is None and len(stages.held_out_split(rlvf)[1]) == 1  # at least one record
    write_mine(mine, 2 * stages.HELD_OUT_CAP)
    assert len(stages.held_out_split(ft.parse(["--data_path", str(mine), "--val_fraction", "0.9"])[1])[1]) == (
        stages.HELD_OUT_CAP)
    write_mine(mine, 1)
    with pytest.raises(stages.TrainError, match="needs at least 2; pass --test_data_path"):
        stages.held_out_split(ft.parse(["--data_path", str(mine)])[1])
