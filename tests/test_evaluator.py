"""Tests for evaluator.py: test files read and checked per model type, bits per byte of documents against a hand
computation, generation batching, the reward and classifier paths, CLI. (The scoring functions themselves:
test_scoring.py; BLEU/ROUGE: test_text_metrics.py.)"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import evaluator
import scoring
from cli_cases import assert_one_line_error, run_main
from conftest import VAL_TXT, BigramModel, bigram_nll, corpus_lines
from decoding import SamplingParams, generate
from evaluator import EvaluationError, GPTEvaluator
from prompts import SFT_TEMPLATE, record_prompt_ids

ROOT = Path(__file__).resolve().parent.parent
GREEDY_12 = SamplingParams(max_new_tokens=12, do_sample=False)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


DOCS = ["ROMEO: But soft, what light through yonder window breaks?", "床前明月光，疑是地上霜。", "A",
        "HAMLET: To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer."]


def test_evaluate_pretrained_matches_token_by_token_reference(tiny_tokenizer, tmp_path):
    """The documents are one stream `<s> doc </s> <s> doc </s> ...`; a bigram model only looks one token back, so
    scoring it in 8-token windows must equal the sum over every adjacent pair of that stream."""
    tok = tiny_tokenizer
    table = torch.randn(len(tok), len(tok), generator=torch.Generator().manual_seed(0))
    path = write_lines(tmp_path / "test.txt", [DOCS[0], "", *DOCS[1:]])  # the blank line is no document
    result = GPTEvaluator(BigramModel(table, max_seq_len=8), tok,
                          show_progress=False).evaluate_pretrained(path, batch_size=3)

    stream = [i for doc in DOCS for i in tok.encode(doc)["input_ids"]]  # each doc is <s> doc </s>
    expected_nll = sum(bigram_nll(table, p, n) for p, n in zip(stream, stream[1:]))
    expected_tokens = len(stream) - 1  # every token but the first is predicted once
    n_bytes = sum(len(doc.encode("utf-8")) + 1 for doc in DOCS)  # the predicted tokens' text, a newline per </s>
    assert result["n_documents"] == 4 and result["n_tokens"] == expected_tokens and result["n_bytes"] == n_bytes
    assert result["loss"] == pytest.approx(expected_nll / expected_tokens, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected_nll / expected_tokens), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(expected_nll / (math.log(2) * n_bytes), rel=1e-5)


@pytest.mark.parametrize("name", ["test.jsonl.gz", "test.parquet"])
def test_evaluate_pretrained_reads_every_format_and_its_text_field(name, tiny_tokenizer, tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = torch.randn(len(tiny_tokenizer), len(tiny_tokenizer), generator=torch.Generator().manual_seed(0))
    evaluate = GPTEvaluator(BigramModel(table, max_seq_len=8), tiny_tokenizer, show_progress=False).evaluate_pretrained
    expected = evaluate(write_lines(tmp_path / "test.txt", DOCS))
    path = tmp_path / name
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress("".join(json.dumps({"body": d}) + "\n" for d in DOCS).encode()))
    else:
        pq.write_table(pa.table({"body": DOCS}), path, row_group_size=3)
    assert evaluate(path, text_field="body") == pytest.approx(expected)


def test_evaluate_sft_scores_response_tokens_only(tiny_tokenizer, tiny_config, tmp_path):
    from gpt_model import GPTModel

    torch.manual_seed(1)
    model = GPTModel(tiny_config).eval()
    tok = tiny_tokenizer
    records = [{"instruction": "写一句诗", "response": "床前明月光"},
               {"instruction": "Who speaks?", "input": "ROMEO", "response": "ROMEO: soft!"}]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    result = GPTEvaluator(model, tok, show_progress=False).evaluate_sft(path, GREEDY_12, batch_size=2)

    total, n_tokens = 0.0, 0
    with torch.no_grad():
        expected = [("### 指令:写一句诗\n### 响应:", "床前明月光"), ("### 指令:Who speaks?\nROMEO\n### 响应:", "ROMEO: soft!")]
        for prompt, response in expected:
            prompt_ids = [tok.bos_token_id] + tok.encode_ordinary(prompt)
            response_ids = tok.encode_ordinary(response) + [tok.eos_token_id]
            ids = torch.tensor([prompt_ids + response_ids])
            labels = torch.tensor([[-100] * len(prompt_ids) + response_ids])
            total += model(ids, labels=labels)["loss"].item() * len(response_ids)
            n_tokens += len(response_ids)
    assert result["n_tokens"] == n_tokens
    assert result["loss"] == pytest.approx(total / n_tokens, rel=1e-5)
    for key in ("bleu", "sentence_bleu", "rouge-1", "rouge-2", "rouge-l"):
        assert 0.0 <= result[key] <= 1.0
    assert result["examples"][0]["prompt"] == "### 指令:写一句诗\n### 响应:"


# ----------------------------------------------------------------------------- generation

def test_batched_generation_equals_one_prompt_at_a_time(tiny_tokenizer, tiny_config):
    from gpt_model import GPTModel

    torch.manual_seed(2)
    model = GPTModel(tiny_config).eval()
    tok = tiny_tokenizer
    prompts = ["HAMLET:", "《静夜思》 李白：", "ROMEO: But soft, what light", "A"]
    ev = GPTEvaluator(model, tok, show_progress=False)
    got = ev.generate_predictions(prompts, SamplingParams(max_new_tokens=10, do_sample=False), batch_size=3)
    for prompt, prediction in zip(prompts, got):
        ids = torch.tensor([[tok.bos_token_id] + tok.encode_ordinary(prompt)])  # unpadded, alone
        params = SamplingParams(max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_token_id)
        new = generate(model, ids, params)[0, ids.shape[1]:].tolist()
        new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        assert prediction == tok.decode(new)

    sampled = SamplingParams(max_new_tokens=8, temperature=0.8)
    first = ev.generate_predictions(prompts, sampled, seed=123, batch_size=2)
    assert ev.generate_predictions(prompts, sampled, seed=123, batch_size=2) == first


def test_a_short_prompt_keeps_its_room_when_batched_with_a_long_one(tiny_tokenizer, tiny_config):
    """In one left-padded tensor the longest prompt would cap every row at 64 − its length; here it does not."""
    from gpt_model import GPTModel

    torch.manual_seed(3)
    model = GPTModel(tiny_config).eval()
    tok = tiny_tokenizer
    prompts = ["A", " ".join(map(str, range(12)))]
    assert 64 - 40 < len(tok.encode_ordinary(prompts[1])) < 62  # it fits, leaving fewer than 40 new tokens
    ev = GPTEvaluator(model, tok, show_progress=False)
    greedy = SamplingParams(max_new_tokens=40, do_sample=False)
    batched = ev.generate_predictions(prompts, greedy, batch_size=2, min_new_tokens=1)
    alone = [ev.generate_predictions([p], greedy, min_new_tokens=1)[0] for p in prompts]
    assert batched == alone


class ScriptedResponses:
    """Stands in for decoding.generate_responses: a fixed continuation for every prompt; records each call."""

    def __init__(self, continuation: list[int]):
        self.continuation, self.calls = continuation, []

    def __call__(self, model, prompts, params, batch_size=64, generator=None, on_finish=None, tokenizer=None):
        self.calls.append(SimpleNamespace(prompts=[list(p) for p in prompts], params=params, batch_size=batch_size))
        return [list(self.continuation) for _ in prompts]


def scripted(monkeypatch, continuation: list[int]) -> ScriptedResponses:
    script = ScriptedResponses(continuation)
    monkeypatch.setattr(scoring, "generate_responses", script)
    return script


class Context64(torch.nn.Module):
    """A model of which the evaluator reads only its context length and device."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_seq_len=64)


def test_predictions_stop_at_eos_and_keep_order(tiny_tokenizer, monkeypatch):
    tok = tiny_tokenizer
    script = scripted(monkeypatch, tok.encode_ordinary("明月 light") + [tok.eos_token_id] + tok.encode_ordinary("x"))
    prompts = ["a much longer prompt than the others", "x", "床前"]
    ev = GPTEvaluator(Context64(), tok, show_progress=False)
    predictions = ev.generate_predictions(prompts, SamplingParams(), batch_size=2)  # eos: the tokenizer's
    assert predictions == ["明月 light"] * 3
    (call,) = script.calls  # one engine run, batch_size slots at a time
    assert call.batch_size == 2 and call.params.eos_token_id == tok.eos_token_id
    assert call.prompts == [[tok.bos_token_id, *tok.encode_ordinary(p)] for p in prompts]  # in order, unpadded


def test_too_long_prompt_keeps_its_tail_and_room_to_generate(tiny_tokenizer, monkeypatch):
    tok = tiny_tokenizer
    script = scripted(monkeypatch, [tok.eos_token_id])
    prompt = " ".join(str(i) for i in range(200))
    with pytest.warns(UserWarning, match="was cut"):
        ev = GPTEvaluator(Context64(), tok, show_progress=False)
        assert ev.generate_predictions([prompt], SamplingParams(max_new_tokens=10)) == [""]
    sent = script.calls[0].prompts[0]
    assert len(sent) == 64 - 10 and sent[0] == tok.bos_token_id  # `<s>` + the prompt's last tokens
    assert sent[1:] == tok.encode_ordinary(prompt)[-(len(sent) - 1):]


# ----------------------------------------------------------------------------- bad input and CLI

@pytest.mark.parametrize("flags, expected", [
    ([], SamplingParams(max_new_tokens=100, do_sample=False, temperature=0.8, top_k=50, top_p=1.0)),
    (["--do_sample", "--temperature", "1.3", "--top_k", "0", "--top_p", "0.9", "--max_new_tokens", "7"],
     SamplingParams(max_new_tokens=7, do_sample=True, temperature=1.3, top_k=0, top_p=0.9)),
    (["--best_of", "3"], SamplingParams(max_new_tokens=100, do_sample=True, temperature=0.8, top_k=50)),
])
def test_generation_flags_build_the_one_sampling_params(flags, expected):
    """The CLI's flags become one SamplingParams (greedy unless --do_sample; best-of-N always samples)."""
    args = evaluator.parse_args(["--model_type", "sft", "--model_path", "m.pth", "--test_data_path", "t.jsonl",
                                 *flags])
    assert evaluator.sampling_params(args) == expected


def test_data_that_does_not_fit_the_model_type_is_rejected(tiny_tokenizer, tmp_path):
    ev = GPTEvaluator(BigramModel(torch.zeros(len(tiny_tokenizer), len(tiny_tokenizer))), tiny_tokenizer,
                      show_progress=False)
    txt = write_lines(tmp_path / "docs.txt", DOCS)
    sft_json = tmp_path / "sft.json"
    sft_json.write_text(json.dumps([{"instruction": "i", "response": "r"}]), encoding="utf-8")
    sft_jsonl = write_lines(tmp_path / "sft.jsonl", [json.dumps({"instruction": "i", "response": "r"})])
    with pytest.raises(EvaluationError, match="--model_type pretrain"):
        ev.evaluate_sft(txt, GREEDY_12)
    with pytest.raises(EvaluationError, match="--model_type sft"):
        ev.evaluate_pretrained(sft_json)
    with pytest.raises(EvaluationError, match="--model_type sft"):
        ev.evaluate_pretrained(sft_jsonl)
    with pytest.raises(EvaluationError, match="not found"):
        ev.evaluate_pretrained(tmp_path / "missing.txt")
    from readers import DataError

    with pytest.raises(DataError):
        ev.evaluate_pretrained(write_lines(tmp_path / "empty.txt", ["", "  "]))


@pytest.fixture()
def checkpoint_dir(tiny_tokenizer, tiny_tokenizer_dir, tiny_config, tmp_path) -> Path:
    """Two tiny checkpoints (different seeds) with a copy of their tokenizer, as the trainer lays them out."""
    from checkpoints import save_checkpoint
    from gpt_model import GPTModel

    folder = tmp_path / "run"
    shutil.copytree(tiny_tokenizer_dir, folder / "tokenizer")
    for seed, name in ((0, "a.pth"), (1, "b.pth")):
        torch.manual_seed(seed)
        save_checkpoint(folder / name, GPTModel(tiny_config), tokenizer_fingerprint=tiny_tokenizer.fingerprint)
    save_checkpoint(folder / "foreign.pth", GPTModel(tiny_config), tokenizer_fingerprint="0" * 64)
    return folder


def run_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "evaluator.py"), "--no_progress", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_pretrain_sft_and_compare(checkpoint_dir, tmp_path):
    txt = write_lines(tmp_path / "test.txt", DOCS)
    sft = write_lines(tmp_path / "test.jsonl",
                      [json.dumps({"instruction": "写诗", "response": "床前明月光"}, ensure_ascii=False),
                       json.dumps({"instruction": "Who?", "response": "ROMEO"})])
    report = tmp_path / "pretrain.json"
    done = run_cli("--model_path", str(checkpoint_dir / "a.pth"), "--test_data_path", str(txt), "--output", str(report))
    assert done.returncode == 0, done.stderr
    result = json.loads(report.read_text(encoding="utf-8"))["results"][0]
    assert "bits_per_byte" in done.stdout and result["n_documents"] == 4
    assert result["bits_per_byte"] == pytest.approx(result["loss"] * result["n_tokens"]
                                                    / (math.log(2) * result["n_bytes"]))

    report = tmp_path / "compare.json"
    plot = tmp_path / "compare.png"
    done = run_cli("--model_type", "sft", "--compare", str(checkpoint_dir / "a.pth"), str(checkpoint_dir / "b.pth"),
                   "--test_data_path", str(sft),
                   "--max_new_tokens", "8", "--output", str(report), "--plot", str(plot))
    assert done.returncode == 0, done.stderr
    saved = json.loads(report.read_text(encoding="utf-8"))
    results = saved["results"]
    assert saved["settings"]["max_new_tokens"] == 8 and "max_gen_len" not in saved["settings"]
    assert [Path(r["model_path"]).name for r in results] == ["a.pth", "b.pth"]
    assert results[0]["loss"] != results[1]["loss"] and "rouge-l" in done.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_errors_are_one_line(checkpoint_dir, tmp_path, capsys):
    txt = write_lines(tmp_path / "test.txt", DOCS)
    empty = write_lines(tmp_path / "e.txt", [""])
    good = str(checkpoint_dir / "a.pth")
    cases = [(["--model_path", str(checkpoint_dir / "foreign.pth"), "--test_data_path", str(txt)], "fingerprint"),
             (["--model_path", str(checkpoint_dir / "missing.pth"), "--test_data_path", str(txt)], "missing.pth"),
             (["--model_path", good, "--test_data_path", str(empty)], "no documents"),
             (["--model_path", good, "--test_data_path", str(txt), "--tokenizer_dir", str(tmp_path / "nope")], "nope"),
             (["--model_type", "sft", "--model_path", good, "--test_data_path", str(txt)], "--model_type pretrain"),
             (["--model_path", good, "--test_data_path", str(txt), "--dtype", "int3"], "int3")]
    for argv, fragment in cases:
        assert evaluator.main(["--no_progress", "--output", str(tmp_path / "r.json"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and fragment in err and err.count("\n") == 1, err


def test_num_threads_is_set_before_any_checkpoint_loads(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(evaluator, "set_threads", calls.append)
    txt = write_lines(tmp_path / "test.txt", DOCS)
    code = evaluator.main(["--model_path", str(tmp_path / "missing.pth"), "--test_data_path", str(txt),
                           "--num_threads", "3", "--output", str(tmp_path / "r.json"), "--no_progress"])
    assert code == 2 and calls == [3] and "missing.pth" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("likelihood_weight", [0.0, 0.5])
def test_reward_model_type_and_reward_scores_of_responses(checkpoint_dir, tiny_config, tiny_tokenizer, tmp_path,
                                                          capsys, likelihood_weight):
    """A reward model (with or without the answer likelihood in its score): pairwise accuracy and margins checked
    against a direct call, and best-of-N's scores of (prompt, response) equal to the pair's."""
    import evaluator
    from checkpoints import save_checkpoint
    from data_loader import PreferencePairDataset, collate_pairs
    from reward_scoring import reward_scores
    from gpt_model import GPTModel
    from model_heads import GPTRewardModel

    torch.manual_seed(0)
    reward = GPTRewardModel.from_language_model(GPTModel(tiny_config), likelihood_weight)
    save_checkpoint(checkpoint_dir / "reward.pth", reward, tokenizer_fingerprint=tiny_tokenizer.fingerprint,
                    model_class="reward", reward_likelihood=reward.likelihood)
    pairs = [{"instruction": "计算 1 + 2 = ?", "chosen": "3", "rejected": "4", "task": "arithmetic"},
             {"instruction": "Who?", "chosen": "ROMEO", "rejected": "JULIET", "task": "speaker"},
             {"instruction": "下一句：床前明月光", "chosen": "疑是地上霜", "rejected": "低头思故乡"}]
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(pairs, ensure_ascii=False), encoding="utf-8")
    batch = collate_pairs([PreferencePairDataset(pairs, tiny_tokenizer, 64)[i] for i in range(3)],
                          tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        chosen, rejected = reward.score(batch["input_ids"], batch["attention_mask"], batch["labels"]).chunk(2)
    prompts = [record_prompt_ids(tiny_tokenizer, p, SFT_TEMPLATE) for p in pairs]
    picked = reward_scores(reward, tiny_tokenizer, prompts, [p["chosen"] for p in pairs], torch.device("cpu"))
    assert picked == pytest.approx(chosen.tolist(), abs=1e-5)
    report = tmp_path / "reward.json"
    assert evaluator.main(["--model_type", "reward", "--model_path", str(checkpoint_dir / "reward.pth"),
                           "--test_data_path", str(data), "--output", str(report), "--no_progress"]) == 0
    result = json.loads(report.read_text(encoding="utf-8"))["results"][0]
    assert result["pairwise_accuracy"] == pytest.approx(float((chosen > rejected).float().mean()))
    assert result["mean_margin"] == pytest.approx(float((chosen - rejected).mean()), rel=1e-4)
    assert result["pairwise_accuracy/arithmetic"] == float(chosen[0] > rejected[0])  # one pair per task here
    assert result["pairwise_accuracy/speaker"] == float(chosen[1] > rejected[1])
    assert "pairwise_accuracy/speaker" in capsys.readouterr().out

    sft = tmp_path / "sft.json"
    sft.write_text(json.dumps([{"instruction": p["instruction"], "response": p["chosen"], "task": p.get("task", "x")}
                               for p in pairs], ensure_ascii=False), encoding="utf-8")
    assert evaluator.main(["--model_type", "sft", "--model_path", str(checkpoint_dir / "a.pth"), "--reward_model",
                           str(checkpoint_dir / "reward.pth"), "--test_data_path", str(sft), "--max_new_tokens", "4",
                           "--output", str(report), "--no_progress"]) == 0
    result = json.loads(report.read_text(encoding="utf-8"))["results"][0]
    assert {"exact_match", "exact_match/arithmetic", "exact_match/speaker", "reward_score"} <= set(result)
    assert math.isfinite(result["reward_score"])
    capsys.readouterr()
    code = evaluator.main(["--model_type", "sft", "--model_path", str(checkpoint_dir / "reward.pth"),
                           "--test_data_path", str(sft), "--no_progress"])
    assert code == 2 and "use --model_type reward" in capsys.readouterr().err


def test_best_of_n_keeps_the_sample_the_reward_model_scores_highest(tiny_config, tiny_tokenizer, monkeypatch):
    import evaluator
    from gpt_model import GPTModel

    ev = evaluator.GPTEvaluator(GPTModel(tiny_config), tiny_tokenizer, show_progress=False)
    samples = ["a", "bbb", "cc", "dddd", "e", "ff"]  # 2 prompts x 3 samples, in generation order
    monkeypatch.setattr(ev, "generate_predictions", lambda prompts, sampling, **kw: samples[:len(prompts)])
    monkeypatch.setattr(evaluator, "reward_scores",
                        lambda rm, tok, prompts, responses, device: [len(r) for r in responses])
    sampled = SamplingParams(max_new_tokens=4)
    assert ev.best_of_n_predictions(["p", "q"], 3, object(), sampled) == ["bbb", "dddd"]
    with pytest.raises(evaluator.EvaluationError):
        ev.best_of_n_predictions(["p"], 0, object(), sampled)
    with pytest.raises(evaluator.EvaluationError, match="reward model or the records' verifiers"):
        ev.best_of_n_predictions(["p"], 2, None, sampled)
    with pytest.raises(evaluator.EvaluationError, match="greedy decoding gives one answer n times"):
        ev.best_of_n_predictions(["p"], 2, object(), SamplingParams(do_sample=False))


def test_best_of_n_with_verifiers_keeps_a_sample_that_verifies(tiny_config, tiny_tokenizer, monkeypatch):
    import evaluator
    from gpt_model import GPTModel

    ev = evaluator.GPTEvaluator(GPTModel(tiny_config), tiny_tokenizer, show_progress=False)
    samples = ["41", "答案是 42。", "42", "ROMEO", "JULIET", "juliet"]  # 2 prompts x 3 samples
    monkeypatch.setattr(ev, "generate_predictions", lambda prompts, sampling, **kw: samples[:len(prompts)])
    records = [{"response": "42", "task": "arithmetic"}, {"response": "JULIET", "task": "speaker"}]
    picks = ev.best_of_n_predictions(["p", "q"], 3, None, SamplingParams(), records=records)
    assert picks == ["答案是 42。", "JULIET"]  # the first that verifies (math reads the number; exact matches)


def test_dialogues_are_scored_per_turn_with_own_or_reference_history(tiny_tokenizer, monkeypatch):
    from prompts import CHAT_TEMPLATE

    tok = tiny_tokenizer
    ev = GPTEvaluator(BigramModel(torch.zeros(len(tok), len(tok))), tok, show_progress=False, template=CHAT_TEMPLATE)
    seen: list[str] = []

    def always_42(prompts, sampling, **_):  # a "model" that answers 42 to everything, recording what it was shown
        assert sampling == GREEDY_12
        seen.extend(tok.decode(p, skip_special_tokens=False) for p in prompts)
        return ["42"] * len(prompts)

    monkeypatch.setattr(ev, "generate_predictions", always_42)
    chat = lambda *turns: [m for u, a in turns for m in ({"role": "user", "content": u},  # noqa: E731
                                                          {"role": "assistant", "content": a})]
    records = [{"messages": chat(("1+41?", "42"), ("+8?", "50")), "task": "a"},
               {"messages": chat(("3+4?", "7"), ("+35?", "42"), ("+0?", "42")), "task": "b"}]
    own = ev.dialogue_exact_match(records, GREEDY_12, own_history=True)
    assert own == {"turn1": 0.5, "a/turn1": 1.0, "b/turn1": 0.0, "turn2": 0.5, "a/turn2": 0.0, "b/turn2": 1.0,
                   "turn3": 1.0, "b/turn3": 1.0}
    assert "<|user|>3+4?<|end|><|assistant|>42</s><|user|>+35?<|end|><|assistant|>" in "\n".join(seen)
    seen.clear()
    ev.dialogue_exact_match(records, GREEDY_12, own_history=False)
    assert "<|user|>3+4?<|end|><|assistant|>7</s><|user|>+35?<|end|><|assistant|>" in "\n".join(seen)


def test_evaluator_bad_files(shared, tmp_path, capsys):
    checkpoint = shared["ckpt"]
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"fine\n\xff\xfe\n")
    good = tmp_path / "val.txt"
    good.write_text("\n".join(corpus_lines(VAL_TXT, limit=3)), encoding="utf-8")
    cases = {f"{latin1}:2": ["--model_path", str(checkpoint), "--test_data_path", str(latin1)],
             "is a folder": ["--model_path", str(checkpoint), "--test_data_path", str(good), "--output", str(tmp_path)],
             "not found": ["--model_path", str(tmp_path / "missing.pth"), "--test_data_path", str(good)]}
    for expected, args in cases.items():
        code, err = run_main(evaluator.main, args + ["--no_progress"], capsys)
        assert_one_line_error(code, err)
        assert expected in err, (expected, err)



def test_a_turn_written_with_a_tool_call_is_scored_on_its_answer():
    trace = "<|tool_call|>50+8<|/tool_call|><|tool_result|>58<|/tool_result|>58"
    predicted = [["50", trace], ["50", trace.replace("|>58", "|>59")]]
    assert evaluator.turn_exact_match(predicted, [["50", "58"], ["50", "58"]], [None, None]) == {
        "turn1": 1.0, "turn2": 0.5}
