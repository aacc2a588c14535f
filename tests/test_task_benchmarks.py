"""task_benchmarks against independent references: fixtures written here in the published formats (HellaSwag's
jsonl, AI2's and Hugging Face's ARC, MMLU's csv and Hugging Face parquet, GSM8K's jsonl) read back as hand-written
examples; per-choice log-likelihoods equal those transformers computes on the model exported with
``inference.export`` (its own tokenizer, log_softmax and gather), with the same acc / acc_norm decisions; generated
GSM8K answers equal transformers' greedy ones; CORE centring checked by hand; the evaluator CLI runs --tasks and
refuses bad values in one line."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import transformers

import evaluator
import task_benchmarks as tb
from checkpoints import save_checkpoint
from conftest import VAL_TXT, corpus_lines
from gpt_model import GPTConfig, GPTModel
from inference import export
from readers import DataError

pytestmark = pytest.mark.usefixtures("one_thread")
LINES = corpus_lines(limit=200)
MAX_SEQ_LEN = 64


# ----------------------------------------------------------------------------- fixtures in the published formats

def words(i: int, n: int) -> str:
    """n words of corpus line i (no speaker name), a stand-in for benchmark text."""
    return " ".join(LINES[i % len(LINES)].split(": ", 1)[-1].split()[:n])


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def hellaswag_rows(n: int) -> list[dict]:
    """Rows as in the official hellaswag_val.jsonl (WikiHow contexts carry [title]/[step] tags)."""
    rows = []
    for i in range(n):
        ctx_a, ctx_b = words(i, 9), words(i + 50, 4).lower()
        rows.append({"ind": 24 + i, "activity_label": "Roof shingle removal" if i % 2 else "Home and Garden",
                     "ctx_a": ctx_a + (" [title] Remove the old nails." if i == 1 else ""), "ctx_b": ctx_b,
                     "ctx": f"{ctx_a} {ctx_b}", "split": "val", "split_type": "indomain", "label": i % 4,
                     "endings": [words(i + k * 7, 3 + 2 * k) + (" [step] next." if k == 2 else "") for k in range(4)],
                     "source_id": f"activitynet~v_{i}"})
    return rows


def arc_ai2_rows(n: int) -> list[dict]:
    """AI2's ARC-Easy jsonl: a nested question with 3 to 5 labelled choices (some files label them 1-4)."""
    rows = []
    for i in range(n):
        count, labels = 3 + i % 3, "ABCDE" if i != 2 else "12345"
        rows.append({"id": f"Mercury_{i}", "question": {"stem": words(i + 3, 8) + "?", "choices": [
            {"text": words(i + 11 * k, 2 + k), "label": labels[k]} for k in range(count)]},
            "answerKey": labels[(i + 1) % count]})
    return rows


def arc_hf_rows(n: int) -> list[dict]:
    """The Hugging Face allenai/ai2_arc shape: flat question, choices as parallel text / label lists."""
    return [{"id": row["id"], "question": row["question"]["stem"],
             "choices": {"text": [c["text"] for c in row["question"]["choices"]],
                         "label": [c["label"] for c in row["question"]["choices"]]},
             "answerKey": row["answerKey"]} for row in arc_ai2_rows(n)]


def mmlu_rows(n: int) -> list[list[str]]:
    """Rows of MMLU's data/test/<subject>_test.csv: question, A, B, C, D, answer letter (no header)."""
    return [[words(i + 5, 10) + ("\nwith a second line, and a comma" if i == 0 else ""),
             *(words(i + 13 * k, 1 + k) for k in range(4)), "ABCD"[(3 * i) % 4]] for i in range(n)]


def gsm8k_rows(n: int) -> list[dict]:
    answers = ["1,234", "-7", "3.5", "18"]
    return [{"question": words(i + 9, 12) + " How many?",
             "answer": f"{words(i, 5)} <<3*6=18>>18.\nSo the total is {answers[i % 4]}.\n#### {answers[i % 4]}"}
            for i in range(n)]


@pytest.fixture(scope="module")
def bench_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bench")
    mmlu = folder / "mmlu_test"
    mmlu.mkdir()
    for name, rows in (("abstract_algebra_test.csv", mmlu_rows(4)), ("anatomy_test.csv", mmlu_rows(7)[4:])):
        with open(mmlu / name, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(rows)
    hf_mmlu = [{"question": row[0], "subject": "anatomy", "choices": row[1:5], "answer": "ABCD".index(row[5])}
               for row in mmlu_rows(4)]
    return {"hellaswag": write_jsonl(folder / "hellaswag_val.jsonl", hellaswag_rows(6)),
            "arc_easy": write_jsonl(folder / "ARC-Easy-Test.jsonl", arc_ai2_rows(5)),
            "arc_hf": write_parquet(folder / "arc_easy_test.parquet", arc_hf_rows(5)),
            "arc_hf_jsonl": write_jsonl(folder / "arc_easy_test.jsonl", arc_hf_rows(5)),
            "mmlu": mmlu, "mmlu_hf": write_parquet(folder / "mmlu_test.parquet", hf_mmlu),
            "gsm8k": write_jsonl(folder / "gsm8k_test.jsonl", gsm8k_rows(4))}


# ----------------------------------------------------------------------------- readers

def test_hellaswag_reads_as_lm_evaluation_harness_preprocesses_it(bench_files):
    loaded = tb.load_task("hellaswag", bench_files["hellaswag"])
    rows = hellaswag_rows(6)
    first = loaded.examples[0]
    assert first.context == f"Home and Garden: {rows[0]['ctx_a']} {rows[0]['ctx_b'].capitalize()}"
    assert first.choices[0] == rows[0]["endings"][0] and first.label == 0
    assert loaded.examples[1].context.startswith("Roof shingle removal: ")
    assert ". Remove the old nails." in loaded.examples[1].context and "[title]" not in loaded.examples[1].context
    assert loaded.examples[0].choices[2] == rows[0]["endings"][2].replace(" [step]", "")  # tag gone, one space left
    assert [e.label for e in loaded.examples] == [0, 1, 2, 3, 0, 1]
    string_labels = write_jsonl(bench_files["hellaswag"].parent / "hs_hf.jsonl",
                                [{**row, "label": str(row["label"])} for row in rows])
    assert tb.load_task("hellaswag", string_labels).examples == loaded.examples  # the HF copy's "3"


def test_arc_reads_the_same_from_ai2_jsonl_and_hugging_face_parquet_and_jsonl(bench_files):
    ai2 = tb.load_task("arc_easy", bench_files["arc_easy"]).examples
    assert tb.load_task("arc_easy", bench_files["arc_hf"]).examples == ai2
    assert tb.load_task("arc_challenge", bench_files["arc_hf_jsonl"]).examples == ai2
    row = arc_ai2_rows(5)[2]  # numbered labels "1".."5", answerKey "4"
    assert ai2[2].context == f"Question: {row['question']['stem']}\nAnswer:"
    assert ai2[2].choices == tuple(c["text"] for c in row["question"]["choices"])
    assert ai2[2].label == 3 and [len(e.choices) for e in ai2] == [3, 4, 5, 3, 4]


def test_mmlu_reads_the_original_csv_folder_and_the_hugging_face_parquet(bench_files):
    examples = tb.load_task("mmlu", bench_files["mmlu"]).examples
    rows = mmlu_rows(7)
    assert len(examples) == 7  # both subject files, in name order
    assert examples[0].context == "\n".join([rows[0][0], *(f"{l}. {t}" for l, t in zip("ABCD", rows[0][1:5])),
                                             "Answer:"])  # the quoted newline and comma kept
    assert examples[0].choices == ("A", "B", "C", "D")
    assert [e.label for e in examples] == ["ABCD".index(row[5]) for row in rows]
    assert tb.load_task("mmlu", bench_files["mmlu_hf"]).examples == examples[:4]


def test_gsm8k_reads_question_and_final_answer(bench_files):
    examples = tb.load_task("gsm8k", bench_files["gsm8k"]).examples
    assert examples[0].context == f"Question: {gsm8k_rows(1)[0]['question']}\nAnswer:"
    assert [tb.final_number(e.reference) for e in examples] == [1234.0, -7.0, 3.5, 18.0]
    assert examples[0].choices == () and examples[0].answer.endswith("#### 1,234")


def test_few_shot_takes_the_first_k_examples_and_limit_the_next_n(bench_files):
    loaded = tb.load_task("arc_easy", bench_files["arc_easy"], limit=2, num_fewshot=2)
    every = tb.load_task("arc_easy", bench_files["arc_easy"]).examples
    assert loaded.shots == every[:2] and loaded.examples == every[2:4]
    prefix = tb.few_shot_prefix(loaded.shots)
    assert prefix == "".join(f"{e.context} {e.choices[e.label]}\n\n" for e in every[:2])


@pytest.mark.parametrize("task, rows, message", [
    ("hellaswag", [{"ctx": "a", "endings": ["x", "y"], "label": 1}, {"ctx": "b", "endings": ["x"], "label": 0}],
     ":2: 'endings' must be a list of at least 2 strings"),
    ("hellaswag", [{"ctx": "a", "endings": ["x", "y"], "label": ""}], ":1: no label (HellaSwag's test split"),
    ("hellaswag", [{"ctx": "a", "endings": ["x", "y"], "label": 2}], ":1: answer 2 is none of the 2 choices"),
    ("arc_easy", [{"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}],
     ":1: answer 'C' is none of the 2 choices (A, B)"),
    ("arc_easy", [{"question": {"stem": "q", "choices": "ab"}, "answerKey": "A"}], ":1: question.choices must be"),
    ("arc_easy", [[1, 2]], ":1: expected a JSON object, got list"),
    ("mmlu", [{"question": "q", "choices": ["a", "b", "c", "d"], "answer": 4}], ":1: answer 4 is none of the 4"),
    ("gsm8k", [{"question": "q", "answer": "18"}], ":1: the answer has no final '#### <number>' line"),
    ("gsm8k", [{"question": "q"}], ":1: missing or non-str field 'answer'"),
])
def test_a_bad_row_is_a_data_error_naming_file_and_line(task, rows, message, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as info:
        tb.load_task(task, path)
    assert f"{path}{message}" in str(info.value)


def test_bad_files_and_task_lists_are_one_clear_error(tmp_path, bench_files):
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"ctx": "a", "endings": ["x", "y"], "label": 0}\n{"ctx": \n')
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text('q,a,b,c,d,A\n"unterminated,a,b,c,d,B\n')
    short_csv = tmp_path / "short.csv"
    short_csv.write_text("q,a,b,c,d,A\n\nq,a,b\n")
    cut_parquet = tmp_path / "cut.parquet"
    cut_parquet.write_bytes(bench_files["arc_hf"].read_bytes()[:-40])
    cases = [(lambda: tb.load_task("hellaswag", bad_json), f"{bad_json}:2: invalid JSON"),
             (lambda: tb.load_task("mmlu", bad_csv), f"{bad_csv}:2: not a valid CSV row"),
             (lambda: tb.load_task("mmlu", short_csv), f"{short_csv}:3: an MMLU row is question,A,B,C,D,answer"),
             (lambda: tb.load_task("arc_easy", cut_parquet), f"{cut_parquet}: not a readable Parquet file"),
             (lambda: tb.load_task("mmlu", tmp_path / "none.csv"), "none.csv does not exist"),
             (lambda: tb.load_task("mmlu", VAL_TXT), "a benchmark file is .jsonl, .csv, .parquet, not .txt"),
             (lambda: tb.load_task("winogrande", bench_files["mmlu"]), "unknown task 'winogrande'"),
             (lambda: tb.load_task("gsm8k", bench_files["gsm8k"], num_fewshot=4), "none left to score after 4"),
             (lambda: tb.parse_task_list("hellaswag"), "--tasks takes NAME=PATH"),
             (lambda: tb.parse_task_list("mmlu=a,mmlu=b"), "names a task twice"),
             (lambda: tb.parse_task_list("mmlu=a,piqa=b"), "unknown task 'piqa' in --tasks")]
    for call, message in cases:
        with pytest.raises(DataError) as info:
            call()
        assert message in str(info.value), (message, str(info.value))
    assert tb.parse_task_list(" mmlu = data/test ,gsm8k=g.jsonl") == [("mmlu", Path("data/test")),
                                                                       ("gsm8k", Path("g.jsonl"))]


# ----------------------------------------------------------------------------- scores by hand and by property

def test_centring_and_core_by_hand():
    assert tb.centred(0.625, 0.25) == pytest.approx(0.5)  # (0.625 - 0.25) / 0.75
    assert tb.centred(0.25, 0.25) == 0.0 and tb.centred(1.0, 0.2) == 1.0
    assert tb.centred(0.1, 0.25) == pytest.approx(-0.2)  # below chance is negative
    results = {"hellaswag": {"centred": 0.5}, "gsm8k": {"centred": 0.1}}
    assert tb.core_score(results) == pytest.approx(0.3)
    examples = [tb.Example("q", ("aa", "b"), 1, "b"), tb.Example("q", ("a", "b", "c", "d"), 0, "a")]
    scores = tb.multiple_choice_scores([[-2.0, -1.5], [-1.0, -1.0, -0.5, -9.0]], examples)
    # acc: example 1 picks "b" (right), example 2 picks "c" (wrong); acc_norm: -1.0/2 > -1.5/1 picks "aa" (wrong),
    # and -1.0, -1.0, -0.5 per byte pick "c" (wrong)
    assert scores == {"acc": 0.5, "acc_norm": 0.0, "chance": pytest.approx((1 / 2 + 1 / 4) / 2)}


def test_ties_go_to_the_first_choice_and_bytes_not_characters_normalise():
    examples = [tb.Example("q", ("x", "y"), 0, "x"), tb.Example("q", ("日本", "abcd"), 1, "abcd")]
    # 日本 is 6 UTF-8 bytes: -3/6 < -1.6/4 per byte, though per character (-1.5 vs -0.4) it would lose too
    scores = tb.multiple_choice_scores([[-1.0, -1.0], [-3.0, -1.6]], examples)
    assert scores["acc"] == 1.0 and scores["acc_norm"] == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_a_model_that_always_prefers_choice_0_scores_the_share_of_label_0(seed):
    rng = random.Random(seed)
    examples, logprobs = [], []
    for _ in range(200):
        n = rng.randint(2, 5)
        examples.append(tb.Example("q", tuple("abcdefg"[i] * 3 for i in range(n)), rng.randrange(n), ""))
        logprobs.append([-rng.uniform(0, 1)] + [-rng.uniform(1.01, 9) for _ in range(n - 1)])  # choice 0 best
    scores = tb.multiple_choice_scores(logprobs, examples)
    share = sum(e.label == 0 for e in examples) / len(examples)
    assert scores["acc"] == scores["acc_norm"] == pytest.approx(share)  # equal lengths: same decision per byte


@pytest.mark.parametrize("text, number", [
    ("#### 1,234", 1234.0), ("so 1,234,567 in all\n#### 1,234,567", 1234567.0), ("#### -7", -7.0),
    ("The answer is 3.50.", 3.5), ("#### $1,000.25 dollars", 1000.25), ("18 then 20\n####18", 18.0),
    ("She has 5 apples and 12 pears, so 17.", 17.0), ("#### 72\nQuestion: 5 more", 72.0), ("no number here", None),
    ("−12 degrees", -12.0), ("１２３", 123.0), ("1,23 and 4", 4.0),
])
def test_gsm8k_final_number_extraction(text, number):
    assert tb.final_number(text) == number


@pytest.mark.parametrize("generated, reference, match", [
    (" She pays 9 + 9 = 18.\n#### 18", "... #### 18", True), ("The answer is 1234", "#### 1,234", True),
    ("#### 3.50", "#### 3.5", True), ("#### 18", "#### -18", False), ("so 18 then 19", "#### 18", False),
    ("", "#### 0", False),
])
def test_gsm8k_answers_match_on_the_final_number(generated, reference, match):
    assert tb.answer_matches(generated, reference) is match


def test_generation_stops_before_the_next_question():
    assert tb.cut_at_stop(" 5 + 5 = 10\n#### 10\n\nQuestion: next") == " 5 + 5 = 10\n#### 10"
    assert tb.cut_at_stop(" 10 Question: x") == " 10 " and tb.cut_at_stop("plain") == "plain"


# ----------------------------------------------------------------------------- against transformers

@pytest.fixture(scope="module")
def models(tiny_tokenizer, tmp_path_factory) -> tuple[GPTModel, transformers.GPT2LMHeadModel, object, Path]:
    """A tiny model trained a little on the corpus (its choices differ), its checkpoint, and its Hugging Face export
    loaded by transformers with transformers' own tokenizer."""
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), max_seq_len=MAX_SEQ_LEN,
                                           n_layers=2, d_model=64, n_heads=2))
    stream = torch.tensor([t for line in LINES for t in tiny_tokenizer.encode_ordinary(line + "\n")])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(30):
        starts = torch.randint(0, len(stream) - 32, (16,))
        windows = torch.stack([stream[i:i + 32] for i in starts])
        optimizer.zero_grad()
        model(windows, labels=windows)["loss"].backward()
        optimizer.step()
    model.eval()
    save_checkpoint(folder / "model.pth", model, tokenizer_fingerprint=tiny_tokenizer.fingerprint)
    tiny_tokenizer.save(folder / "tokenizer")
    assert export.main(["--model_path", str(folder / "model.pth"), "--format", "hf", "--output",
                        str(folder / "hf")]) == 0
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder / "hf").eval()
    return model, hf, transformers.AutoTokenizer.from_pretrained(folder / "hf"), folder / "model.pth"


def reference_logprob(hf, hf_tok, context: str, choice: str) -> float:
    """Sum log p(continuation | <s> context) from transformers: its tokenizer, its logits, log_softmax and gather;
    a context too long keeps <s> and its last tokens."""
    ctx = hf_tok(context, add_special_tokens=False)["input_ids"]
    cont = hf_tok(" " + choice, add_special_tokens=False)["input_ids"]
    ctx = [hf_tok.bos_token_id, *ctx[len(ctx) - (MAX_SEQ_LEN - len(cont) - 1):]] \
        if 1 + len(ctx) + len(cont) > MAX_SEQ_LEN else [hf_tok.bos_token_id, *ctx]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(ids).logits[0].double(), dim=-1)
    positions = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
    return logprobs[positions, torch.tensor(cont)].sum().item()


@pytest.mark.parametrize("task, num_fewshot", [("hellaswag", 0), ("hellaswag", 2), ("arc_easy", 1), ("mmlu", 1)])
def test_choice_logprobs_and_decisions_equal_transformers(task, num_fewshot, models, bench_files, tiny_tokenizer):
    model, hf, hf_tok, _ = models
    loaded = tb.load_task(task, bench_files[task], num_fewshot=num_fewshot)
    prefix = tb.few_shot_prefix(loaded.shots)
    requests, cut = tb.choice_requests(tiny_tokenizer, loaded.examples, prefix, MAX_SEQ_LEN)
    ours = tb.continuation_logprobs(model, requests, tiny_tokenizer.pad_token_id, tb.BenchmarkParams(batch_size=3))
    theirs = [reference_logprob(hf, hf_tok, prefix + e.context, c) for e in loaded.examples for c in e.choices]
    assert max(abs(a - b) for a, b in zip(ours, theirs, strict=True)) < 1e-4
    if num_fewshot == 2:
        assert cut > 0  # the demonstrations overflow 64 tokens: truncation was exercised
    acc = acc_norm = 0
    for example in loaded.examples:
        scores = [theirs.pop(0) for _ in example.choices]
        per_byte = [s / len(c.encode()) for s, c in zip(scores, example.choices)]
        acc += scores.index(max(scores)) == example.label
        acc_norm += per_byte.index(max(per_byte)) == example.label
    result = tb.run_task(model, tiny_tokenizer, loaded, tb.BenchmarkParams(show_progress=False))
    n = len(loaded.examples)
    assert (result["acc"], result["acc_norm"], result["n"]) == (acc / n, acc_norm / n, n)
    chance = sum(1 / len(e.choices) for e in loaded.examples) / n
    assert result["centred"] == pytest.approx((result[result["metric"]] - chance) / (1 - chance))


def test_gsm8k_answers_are_transformers_greedy_continuations(models, bench_files, tiny_tokenizer):
    model, hf, hf_tok, _ = models
    loaded = tb.load_task("gsm8k", bench_files["gsm8k"], num_fewshot=1)
    params = tb.BenchmarkParams(batch_size=2, max_new_tokens=12, show_progress=False)
    prompts = [tb.few_shot_prefix(loaded.shots) + e.context for e in loaded.examples]
    ours, cut = tb.generate_answers(model, tiny_tokenizer, prompts, params)
    limit = MAX_SEQ_LEN - 12
    for prompt, answer in zip(prompts, ours, strict=True):
        ids = [hf_tok.bos_token_id, *hf_tok(prompt, add_special_tokens=False)["input_ids"]]
        ids = ids if len(ids) <= limit else [ids[0], *ids[len(ids) - limit + 1:]]
        out = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                          eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id)[0, len(ids):]
        assert answer == tb.cut_at_stop(hf_tok.decode(out, skip_special_tokens=True))
    assert cut == 3  # one demonstration plus a question overflow 52 tokens
    result = tb.run_task(model, tiny_tokenizer, loaded, params)
    expected = sum(tb.answer_matches(a, e.reference) for a, e in zip(ours, loaded.examples)) / len(ours)
    assert (result["acc"], result["chance"], result["centred"], result["n"]) == (expected, 0.0, expected, 3)


# ----------------------------------------------------------------------------- the evaluator CLI

def test_the_evaluator_runs_tasks_and_writes_them_in_its_report(models, bench_files, tmp_path, capsys):
    _, _, _, checkpoint = models
    val = tmp_path / "val.txt"
    val.write_text("\n".join(corpus_lines(VAL_TXT, limit=3)) + "\n", encoding="utf-8")
    tasks = ",".join(f"{name}={bench_files[name]}" for name in ("hellaswag", "arc_easy", "mmlu", "gsm8k"))
    report = tmp_path / "report.json"
    assert evaluator.main(["--model_path", str(checkpoint), "--tasks", tasks, "--limit", "3", "--num_fewshot", "1",
                           "--max_new_tokens", "4", "--test_data_path", str(val), "--output", str(report),
                           "--device", "cpu", "--no_progress"]) == 0
    out = capsys.readouterr().out
    result = json.loads(report.read_text())["results"][0]
    benchmarks = result["benchmarks"]
    assert set(benchmarks["tasks"]) == {"hellaswag", "arc_easy", "mmlu", "gsm8k"} and "perplexity" in result
    for name, figures in benchmarks["tasks"].items():
        assert figures["n"] == 3 and figures["num_fewshot"] == 1 and name in out
        assert figures["centred"] == pytest.approx(tb.centred(figures[figures["metric"]], figures["chance"]))
    assert benchmarks["core"] == pytest.approx(sum(f["centred"] for f in benchmarks["tasks"].values()) / 4)
    assert f"{benchmarks['core']:.4f}" in out.split("CORE")[1] and "perplexity" in out
    assert evaluator.main(["--model_path", str(checkpoint), "--tasks", f"arc_easy={bench_files['arc_hf']}",
                           "--output", str(report), "--device", "cpu", "--no_progress"]) == 0  # tasks alone
    only = json.loads(report.read_text())["results"][0]
    assert "perplexity" not in only and only["benchmarks"]["tasks"]["arc_easy"]["n"] == 5


def test_bad_tasks_are_one_error_line_before_any_model_is_loaded(bench_files, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"ctx": "a", "endings": ["x", "y"], "label": 1}])
    bad.write_text(bad.read_text() + "{oops\n")
    missing_model = str(tmp_path / "missing.pth")  # never reached: the tasks fail first
    cases = [(f"winogrande={bad}", "unknown task 'winogrande' in --tasks"),
             (f"hellaswag={tmp_path / 'none.jsonl'}", "none.jsonl does not exist"),
             (f"hellaswag={bad}", f"{bad}:2: invalid JSON"),
             (f"arc_easy={bench_files['gsm8k']}", f"{bench_files['gsm8k']}:1: missing or non-dict field 'choices'"),
             ("hellaswag", "--tasks takes NAME=PATH")]
    for tasks, message in cases:
        code = evaluator.main(["--model_path", missing_model, "--tasks", tasks, "--output", str(tmp_path / "r.json"),
                               "--no_progress"])
        err = capsys.readouterr().err
        assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert message in err, (message, err)
    assert not (tmp_path / "r.json").exists()
