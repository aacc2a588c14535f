"""scoring: each scoring function against a hand-worked or independent reference (explicit loops, math), and the
acceptance check that a pretraining run's last val_bpb is what ``python evaluator.py`` reports for its checkpoint."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import data_loader
import evaluator
import pretrain_trainer
import scoring
import token_cache
from conftest import BigramModel, bigram_nll, write_corpus
from decoding import SamplingParams, generate
from gpt_model import GPTConfig, GPTModel
from prompts import SFT_TEMPLATE, record_prompt_ids
from readers import read_documents
from run_folder import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = ["ROMEO: But soft, what light through yonder window breaks?", "床前明月光，疑是地上霜。", "A",
        "HAMLET: To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer."]


# ----------------------------------------------------------------------------- loss and perplexity

def test_token_loss_is_token_weighted_and_skips_padding_and_ignored_labels():
    table = torch.tensor([[0.0, 1.0, 2.0], [1.5, -1.0, 0.5], [0.3, 0.2, -0.7]])
    model = BigramModel(table)
    # batch 1: row 0 = [0 1 2 1] all real; row 1 = [2 0] + 2 padding; label of position 2 in row 0 is -100.
    batch1 = {"input_ids": torch.tensor([[0, 1, 2, 1], [2, 0, 0, 0]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]),
              "labels": torch.tensor([[0, 1, -100, 1], [2, 0, 5, 5]])}  # 5s sit on padding: never read
    batch2 = {"input_ids": torch.tensor([[1, 1, 0, 2, 2, 0]]), "labels": torch.tensor([[1, 1, 0, 2, 2, 0]])}
    # predicted (prev -> next) pairs: row0: 0->1, (1->2 ignored), 2->1; row1: 2->0; batch2: every adjacent pair
    nll1 = sum(bigram_nll(table, p, n) for p, n in [(0, 1), (2, 1), (2, 0)])
    nll2 = sum(bigram_nll(table, p, n) for p, n in [(1, 1), (1, 0), (0, 2), (2, 2), (2, 0)])
    figures = scoring.token_loss(model, [batch1, batch2])
    assert figures["n_tokens"] == 8
    assert figures["loss"] == pytest.approx((nll1 + nll2) / 8, rel=1e-6)
    assert figures["perplexity"] == pytest.approx(math.exp((nll1 + nll2) / 8), rel=1e-6)
    mean_of_batch_means = math.exp((nll1 / 3 + nll2 / 5) / 2)
    assert abs(figures["perplexity"] - mean_of_batch_means) > 1e-3  # 3 and 5 tokens: the two averages differ


def test_nothing_to_score_is_a_clear_error():
    batch = {"input_ids": torch.tensor([[0, 1, 2]]), "labels": torch.full((1, 3), -100)}
    with pytest.raises(scoring.ScoringError, match="no tokens to score"):
        scoring.token_loss(BigramModel(torch.zeros(3, 3)), [batch])
    with pytest.raises(scoring.ScoringError, match="no documents"):
        scoring.text_loss(BigramModel(torch.zeros(3, 3)), None, [])


# ----------------------------------------------------------------------------- bits per byte

def window_loop_reference(model: GPTModel, tokens: list[int], byte_lengths: np.ndarray) -> tuple[float, int, int]:
    """(total NLL, predicted tokens, their bytes): one window of the context at a time, stride context - 1, each
    scored alone with an explicit log-softmax."""
    seq_len, total, n_tokens, n_bytes = model.config.max_seq_len, 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, seq_len - 1):
            window = tokens[start:start + seq_len]
            logprobs = model(torch.tensor([window]))["logits"][0].double().log_softmax(-1)
            total -= sum(logprobs[t, window[t + 1]].item() for t in range(len(window) - 1))
            n_tokens += len(window) - 1
            n_bytes += int(sum(byte_lengths[i] for i in window[1:]))
    return total, n_tokens, n_bytes


@pytest.mark.parametrize("batch_size", [1, 3])
def test_text_loss_equals_an_explicit_loop_over_the_stream_windows(tiny_tokenizer, batch_size):
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), max_seq_len=16, n_layers=1,
                                           d_model=32, n_heads=2)).eval()
    tokens = [i for doc in DOCS for i in tiny_tokenizer.encode(doc)["input_ids"]]  # <s> doc </s> <s> doc </s> ...
    total, n_tokens, n_bytes = window_loop_reference(model, tokens, data_loader.token_byte_lengths(tiny_tokenizer))
    figures = scoring.text_loss(model, tiny_tokenizer, DOCS, scoring.ScoreParams(batch_size=batch_size))
    assert figures["n_tokens"] == n_tokens == len(tokens) - 1 and figures["n_documents"] == len(DOCS)
    assert figures["n_bytes"] == n_bytes == sum(len(doc.encode("utf-8")) + 1 for doc in DOCS)  # + the newlines
    assert figures["loss"] == pytest.approx(total / n_tokens, rel=1e-5)
    assert figures["perplexity"] == pytest.approx(math.exp(total / n_tokens), rel=1e-5)
    assert figures["bits_per_byte"] == pytest.approx(total / (math.log(2) * n_bytes), rel=1e-5)


def test_stream_loss_max_batches_scores_the_first_windows_only(tiny_tokenizer):
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), max_seq_len=8, n_layers=1,
                                           d_model=32, n_heads=2)).eval()
    tokens = scoring.text_stream(tiny_tokenizer, DOCS)
    byte_lengths = data_loader.token_byte_lengths(tiny_tokenizer)
    head = tokens[:2 * 2 * 7 + 1]  # two batches of two windows of 8 tokens (stride 7)
    total, n_tokens, n_bytes = window_loop_reference(model, head.tolist(), byte_lengths)
    figures = scoring.stream_loss(model, tokens, byte_lengths, scoring.ScoreParams(batch_size=2), max_batches=2)
    assert figures["n_tokens"] == n_tokens == 28 and figures["n_bytes"] == n_bytes
    assert figures["loss"] == pytest.approx(total / n_tokens, rel=1e-5)
    assert scoring.stream_batch_count(len(tokens), 8, 2) == len(list(data_loader.sequential_batches(tokens, 8, 2)))


def test_the_text_stream_is_the_token_cache_layout(tiny_tokenizer, tmp_path):
    source = tmp_path / "val.txt"
    source.write_text("\n".join(DOCS) + "\n", encoding="utf-8")
    cached = token_cache.build_token_stream(source, tiny_tokenizer, num_workers=1, cache_dir=tmp_path / "cache",
                                            show_progress=False)
    assert scoring.text_stream(tiny_tokenizer, DOCS).tolist() == cached.tokens.tolist()


# ----------------------------------------------------------------------------- SFT responses and exact match

def test_response_loss_scores_answer_tokens_only(tiny_tokenizer, tiny_config):
    torch.manual_seed(1)
    model = GPTModel(tiny_config).eval()
    tok = tiny_tokenizer
    records = [{"instruction": "写一句诗", "response": "床前明月光"},
               {"instruction": "Who speaks?", "input": "ROMEO", "response": "ROMEO: soft!"},
               {"instruction": "1 + 2 = ?", "response": "3"}]
    dataset = data_loader.GPTSFTDataset(records, tok, 64, SFT_TEMPLATE)
    figures = scoring.response_loss(model, dataset, tok.pad_token_id, scoring.ScoreParams(batch_size=2))
    total, n_tokens = 0.0, 0
    with torch.no_grad():
        for record in records:  # one unpadded sequence at a time; only the answer and its </s> are scored
            prompt_ids = record_prompt_ids(tok, record, SFT_TEMPLATE)
            answer = tok.encode_ordinary(record["response"]) + [tok.eos_token_id]
            logprobs = model(torch.tensor([prompt_ids + answer]))["logits"][0].double().log_softmax(-1)
            total -= sum(logprobs[len(prompt_ids) - 1 + t, a].item() for t, a in enumerate(answer))
            n_tokens += len(answer)
    assert figures["n_tokens"] == n_tokens
    assert figures["loss"] == pytest.approx(total / n_tokens, rel=1e-5)


class ScriptedResponses:
    """Stands in for decoding.generate_responses: a fixed continuation per prompt, in order; records each call."""

    def __init__(self, continuations: list[list[int]]):
        self.continuations, self.calls = continuations, []

    def __call__(self, model, prompts, params, batch_size=64, generator=None, on_finish=None, tokenizer=None):
        self.calls.append(SimpleNamespace(prompts=[list(p) for p in prompts], params=params, batch_size=batch_size))
        return [list(c) for c in self.continuations[:len(prompts)]]


class Context64(torch.nn.Module):
    """A model of which scoring reads only its context length and device."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_seq_len=64)


def test_answer_exact_match_by_hand_per_task(tiny_tokenizer, monkeypatch):
    tok = tiny_tokenizer
    answers = ["42", " 7 ", "JULIET", "x"]
    script = ScriptedResponses([tok.encode_ordinary(a) + [tok.eos_token_id] + tok.encode_ordinary("tail")
                                for a in answers])
    monkeypatch.setattr(scoring, "generate_responses", script)
    records = [{"instruction": "1+41?", "response": "42", "task": "sum"},
               {"instruction": "3+4?", "response": "7", "task": "sum"},
               {"instruction": "Who?", "response": "ROMEO", "task": "speaker"},
               {"instruction": "?", "response": "y"}]
    figures = scoring.answer_exact_match(Context64(), tok, records, SFT_TEMPLATE, 16,
                                         scoring.ScoreParams(batch_size=3))
    # right: 42 and 7 (whitespace stripped), wrong: JULIET, x
    assert figures == {"exact_match": 0.5, "exact_match/sum": 1.0, "exact_match/speaker": 0.0}
    (call,) = script.calls  # one greedy engine run, batch_size slots at a time, the prompts as in training
    assert call.batch_size == 3 and not call.params.do_sample and call.params.max_new_tokens == 16
    assert call.prompts == [record_prompt_ids(tok, r, SFT_TEMPLATE) for r in records]


def test_exact_match_never_cuts_a_prompt_that_fits_the_context(tiny_tokenizer, recwarn, monkeypatch):
    tok = tiny_tokenizer
    script = ScriptedResponses([tok.encode_ordinary("42") + [tok.eos_token_id]])
    monkeypatch.setattr(scoring, "generate_responses", script)

    def length(words: int) -> int:
        return len(record_prompt_ids(tok, {"instruction": " ".join(map(str, range(words)))}, SFT_TEMPLATE))

    words = max(n for n in range(1, 100) if length(n) <= 60)
    instruction, prompt_len = " ".join(map(str, range(words))), length(words)
    assert prompt_len > 64 - 16  # longer than a 16-token reserve would allow, short enough to answer
    figures = scoring.answer_exact_match(Context64(), tok, [{"instruction": instruction, "response": "42"}],
                                         SFT_TEMPLATE, 16)
    assert figures["exact_match"] == 1.0 and not [w for w in recwarn if "was cut" in str(w.message)]
    assert len(script.calls[0].prompts[0]) == prompt_len  # the whole prompt was sent


def test_greedy_answers_equal_the_model_generating_one_prompt_at_a_time(tiny_tokenizer, tiny_config):
    torch.manual_seed(2)
    model = GPTModel(tiny_config).eval()
    tok = tiny_tokenizer
    records = [{"instruction": i, "response": "-"} for i in ("HAMLET:", "《静夜思》 李白：", "1 + 2 = ?")]
    got = scoring.greedy_answers(model, tok, records, SFT_TEMPLATE, 10, scoring.ScoreParams(batch_size=2))
    for record, answer in zip(records, got):
        ids = torch.tensor([record_prompt_ids(tok, record, SFT_TEMPLATE)])  # unpadded, alone
        params = SamplingParams(max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_token_id)
        new = generate(model, ids, params)[0, ids.shape[1]:]
        new = new.tolist()
        assert answer == tok.decode(new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new)


# ----------------------------------------------------------------------------- reward pairs

class LengthReward(torch.nn.Module):
    """A reward model scoring each sequence 0.5 x its number of answer tokens: margins computable by hand."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(0.5))
        self.config = SimpleNamespace(max_seq_len=64)

    def score(self, input_ids, attention_mask, labels):
        return self.weight * (labels != -100).sum(-1).float()


def test_reward_pairs_by_hand(tiny_tokenizer):
    tok = tiny_tokenizer
    pairs = [{"instruction": "计算 1 + 2 = ?", "chosen": "3", "rejected": "four or five", "task": "sum"},
             {"instruction": "Who?", "chosen": "ROMEO and JULIET", "rejected": "JULIET", "task": "speaker"},
             {"instruction": "下一句", "chosen": "疑是地上霜", "rejected": "疑是地上霜"}]
    dataset = data_loader.PreferencePairDataset(pairs, tok, 64)
    figures = scoring.reward_pairs(LengthReward(), dataset, tok.pad_token_id, scoring.ScoreParams(batch_size=2),
                                   [p.get("task") for p in pairs])
    answer_len = lambda text: len(tok.encode_ordinary(text)) + 1  # noqa: E731  (the answer and its </s>)
    margins = [0.5 * (answer_len(p["chosen"]) - answer_len(p["rejected"])) for p in pairs]
    assert margins[0] < 0 < margins[1] and margins[2] == 0
    assert figures["pairwise_accuracy"] == pytest.approx(1 / 3)  # a tie is not a win
    assert figures["pairwise_accuracy/sum"] == 0.0 and figures["pairwise_accuracy/speaker"] == 1.0
    assert figures["mean_margin"] == pytest.approx(sum(margins) / 3, rel=1e-6)
    assert figures["loss"] == pytest.approx(sum(math.log1p(math.exp(-m)) for m in margins) / 3, rel=1e-6)
    assert figures["n_samples"] == 3


# ----------------------------------------------------------------------------- classification

class FirstTokenClassifier(torch.nn.Module):
    """Class logits = table[the first token after <s>]: cross-entropy computable by hand."""

    def __init__(self, table: torch.Tensor, labels: list[str]):
        super().__init__()
        self.table, self.labels = torch.nn.Parameter(table), labels
        self.config = SimpleNamespace(max_seq_len=64)

    def forward(self, input_ids, attention_mask=None):
        return self.table[input_ids[:, 1]]


def test_classification_by_hand(tiny_tokenizer):
    tok = tiny_tokenizer
    records = [{"text": t, "label": label} for t, label in
               [("ROMEO: soft", "speech"), ("床前明月光", "poem"), ("JULIET: ay me", "speech"), ("A b", "poem"),
                ("HAMLET: to be", "speech")]]
    labels = ["poem", "speech"]
    table = torch.randn(len(tok), 2, generator=torch.Generator().manual_seed(0))
    model = FirstTokenClassifier(table, labels)
    dataset = data_loader.ClassificationDataset(records, tok, 64, labels)
    figures = scoring.classification(model, dataset, scoring.ScoreParams(batch_size=2))

    rows = [table[tok.encode_ordinary(r["text"])[0]].tolist() for r in records]
    targets = [labels.index(r["label"]) for r in records]
    predicted = [max(range(2), key=row.__getitem__) for row in rows]
    loss = sum(math.log(sum(math.exp(x) for x in row)) - row[t] for row, t in zip(rows, targets)) / len(rows)
    confusion = [[sum(t == i and p == j for t, p in zip(targets, predicted)) for j in range(2)] for i in range(2)]
    assert figures["loss"] == pytest.approx(loss, rel=1e-5)
    assert figures["accuracy"] == pytest.approx(sum(p == t for p, t in zip(predicted, targets)) / 5)
    assert figures["majority_baseline"] == pytest.approx(3 / 5) and figures["n_samples"] == 5
    assert figures["confusion_matrix"] == confusion and figures["labels"] == labels
    for i, label in enumerate(labels):
        column, row = sum(confusion[k][i] for k in range(2)), sum(confusion[i])
        assert figures[f"precision/{label}"] == pytest.approx(confusion[i][i] / column if column else 0.0)
        assert figures[f"recall/{label}"] == pytest.approx(confusion[i][i] / row if row else 0.0)


# ----------------------------------------------------------------------------- one measurement

def test_a_pretraining_runs_last_val_bpb_is_the_evaluators_bits_per_byte(tiny_tokenizer_dir, tmp_path, capsys):
    """The acceptance check: pretrain for a few steps, read the last val_bpb it logged and printed, and evaluate its
    best checkpoint on the same validation file with the evaluator CLI: the same number to 1e-6."""
    train, val = write_corpus(tmp_path, 300, 30)
    out = tmp_path / "run"
    code = pretrain_trainer.main(["--train_data_dir", str(train), "--val_data_dir", str(val), "--tokenizer_dir",
                                  str(tiny_tokenizer_dir), "--output_dir", str(out), "--n_layers", "1", "--d_model",
                                  "32", "--n_heads", "2", "--max_seq_len", "32", "--batch_size", "4", "--max_steps",
                                  "6", "--eval_interval", "6", "--lr", "1e-3", "--num_workers", "1", "--device", "cpu",
                                  "--dtype", "float32", "--samples", "0"])
    printed = capsys.readouterr().out
    assert code == 0
    (last,) = [r for r in read_metrics(out / "metrics.jsonl") if "val_bpb" in r]  # at the end: it saved the best
    assert last["step"] == 6
    summary = json.loads(next(line for line in printed.splitlines() if line.startswith("{")))
    assert summary["val_bpb"] == round(last["val_bpb"], 4)

    report = tmp_path / "report.json"
    code = evaluator.main(["--model_path", str(out / "pretrain_best.pth"), "--test_data_path", str(val),
                           "--batch_size", "4", "--device", "cpu", "--output", str(report), "--no_progress"])
    assert code == 0
    result = json.loads(report.read_text(encoding="utf-8"))["results"][0]
    assert abs(result["bits_per_byte"] - last["val_bpb"]) < 1e-6
    assert abs(result["loss"] - last["val_loss"]) < 1e-6
    assert result["n_bytes"] == sum(len(d.encode("utf-8")) + 1 for d in read_documents(val))  # + their newlines
