"""Tests for text_metrics.py: the scoring tokenizer, BLEU against a hand computation, ROUGE with n-gram multiplicity
and against the `rouge` package, the iterative LCS, and the input checks."""
from __future__ import annotations

import subprocess
import sys

import pytest
from rouge import Rouge

from conftest import ROOT
from text_metrics import (MetricInputError, compute_bleu, lcs_length, mean_sentence_bleu, rouge_scores,
                          score_tokens)


def test_score_tokens_split_cjk_characters_words_and_punctuation():
    assert score_tokens("Hello, World! 你好。abc中文 3.14") == [
        "hello", ",", "world", "!", "你", "好", "。", "abc", "中", "文", "3", ".", "14"]


def test_bleu_known_answer_and_identity():
    # the cat sat on the mat / the cat is on the mat: clipped 1-grams 5/6, 2-grams 3/5 (the cat, on the, the mat),
    # 3-grams 1/4 (on the mat), 4-grams 0/3 -> method1 smoothing makes it 0.1/3; equal lengths so BP = 1.
    expected = (5 / 6 * 3 / 5 * 1 / 4 * (0.1 / 3)) ** 0.25
    assert compute_bleu(["The cat sat on the mat"], [["the cat is on the mat"]]) == pytest.approx(expected)
    assert mean_sentence_bleu(["The cat sat on the mat"], [["the cat is on the mat"]]) == pytest.approx(expected)
    assert compute_bleu(["床前明月光，疑是地上霜。"], [["床前明月光，疑是地上霜。"]]) == pytest.approx(1.0)
    # Chinese scored per character: one wrong character out of five still scores high (whitespace splitting: ~0).
    assert 0.4 < compute_bleu(["床前明月光"], [["床前明日光", "窗前明月光"]]) < 1.0
    assert compute_bleu([""], [["any reference text here"]]) == 0.0
    with pytest.raises(MetricInputError, match="list of reference lists"):
        compute_bleu(["a b c d"], ["a b c d"])


def test_corpus_bleu_pools_counts_unlike_mean_sentence_bleu():
    predictions, references = ["a b c d e f", "x y"], [["a b c d e f"], ["x z"]]
    assert compute_bleu(predictions, references) != pytest.approx(mean_sentence_bleu(predictions, references))


def test_rouge_counts_repeated_ngrams_with_clipping():
    # pred 我 我 我 爱, ref 我 爱 爱 你 (4 tokens each).
    # ROUGE-1: clipped overlap min(3,1) for 我 + min(1,2) for 爱 = 2 -> P = R = F = 2/4
    # (unique sets would give P 1, R 2/3).
    # ROUGE-2: pred bigrams 我我, 我我, 我爱; ref 我爱, 爱爱, 爱你; overlap 我爱 = 1 -> P = R = F = 1/3.
    # ROUGE-L: LCS = 我爱 = 2 -> P = R = F = 2/4.
    scores = rouge_scores(["我我我爱"], ["我爱爱你"])
    assert scores["rouge-1"]["p"] == pytest.approx(0.5) and scores["rouge-1"]["r"] == pytest.approx(0.5)
    assert scores["rouge-1"]["f"] == pytest.approx(0.5, abs=1e-6)
    assert scores["rouge-2"]["f"] == pytest.approx(1 / 3, abs=1e-6)
    assert scores["rouge-l"]["f"] == pytest.approx(0.5, abs=1e-6)


def test_rouge_identity_periods_and_empty_predictions():
    identical = rouge_scores(["Hello. World. 床前明月光。"], ["hello. world. 床前明月光。"])
    assert [identical[m]["f"] for m in ("rouge-1", "rouge-2", "rouge-l")] == pytest.approx([1.0] * 3, abs=1e-6)
    # "a.b" is [a, ., b] against [a, b]: the "." counts as a token (P 2/3, R 1, F 0.8), it does not split sentences.
    assert rouge_scores(["a.b"], ["a b"])["rouge-1"] == pytest.approx({"p": 2 / 3, "r": 1.0, "f": 0.8}, abs=1e-6)
    empty = {"p": 0.0, "r": 0.0, "f": 0.0}
    assert rouge_scores([""], ["some reference"]) == {"rouge-1": empty, "rouge-2": empty, "rouge-l": empty}
    # mean of 0 and 1
    assert rouge_scores(["", "same text"], ["x", "same text"])["rouge-1"]["f"] == pytest.approx(0.5, abs=1e-6)
    long_text = " ".join(f"w{i % 50}" for i in range(1200))  # the package's recursive ROUGE-L would overflow here
    assert rouge_scores([long_text], [long_text])["rouge-l"]["f"] == pytest.approx(1.0)


def test_rouge_matches_the_rouge_package_on_texts_without_periods():
    reference_scorer = Rouge(exclusive=False)
    pairs = [("the cat sat on the mat", "the cat is on the mat"), ("a b a b c", "b a b c a a"), ("x y z", "z y x w")]
    for prediction, reference in pairs:
        ours = rouge_scores([prediction], [reference])
        theirs = reference_scorer.get_scores(prediction, reference)[0]
        for metric in ("rouge-1", "rouge-2", "rouge-l"):
            for stat in ("p", "r", "f"):
                assert ours[metric][stat] == pytest.approx(theirs[metric][stat], abs=1e-6), (prediction, metric, stat)


def test_lcs_length_is_the_longest_common_subsequence():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # BCBA (CLRS's example)
    assert lcs_length([], ["a"]) == 0 and lcs_length(["a"], ["a"]) == 1
    assert lcs_length(["x"] * 1000, ["x"] * 1000) == 1000  # iterative: no recursion limit


def test_mismatched_or_empty_inputs_are_clear_errors():
    with pytest.raises(MetricInputError, match="2 predictions but 1 references"):
        rouge_scores(["a", "b"], ["a"])
    with pytest.raises(MetricInputError, match="no predictions"):
        compute_bleu([], [])
    assert issubclass(MetricInputError, ValueError)  # cli.run_cli reports it as one `error:` line


def test_the_module_does_not_import_torch():
    code = "import sys, text_metrics; text_metrics.rouge_scores(['a b'], ['a c']); sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120).returncode == 0
