"""The SFT / preference demo data: reproducible, split without leaks, every answer checked against the corpus."""
import functools
import json
import re

import pytest

from conftest import ROOT, TRAIN_TXT
from calculator import evaluate
from data.sft import build_sft_data as build_sft

FILES = ("sft_data.json", "sft_test.json", "chat_test.json", "rlhf_pairwise.json", "rlhf_pairwise_test.json")
CORPUS = TRAIN_TXT.read_text(encoding="utf-8").splitlines()
PUNCT = "[，。？！；：、]"  # what separates the lines of a poem (and "：" its body from the title)
POEM_DOCS = [line for line in CORPUS if line.startswith("《")]
SPEECHES_BY_FIRST_WORDS = {}  # (first 3 words of the speech) -> corpus lines, to find a speech without a full scan
for _line in CORPUS:
    if ": " in _line:
        SPEECHES_BY_FIRST_WORDS.setdefault(tuple(_line.split(": ", 1)[1].split()[:3]), []).append(_line)


def load(folder, name):
    return json.loads((folder / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module", autouse=True)
def one_context_tokenizer():
    """Every build here trains the same tokenizer on the same corpus: train it once (deterministic)."""
    original = build_sft.context_tokenizer
    build_sft.context_tokenizer = functools.cache(original)
    yield
    build_sft.context_tokenizer = original


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sft")
    assert build_sft.main(["--seed", "0", "--output_dir", str(folder), "--corpus", str(TRAIN_TXT)]) == 0
    return folder


@pytest.fixture(scope="module")
def built_windows(tmp_path_factory):
    """The same build for a 64-token model (``--context 64``): dialogues too long for it are split into windows."""
    folder = tmp_path_factory.mktemp("sft_windows")
    assert build_sft.main(["--seed", "0", "--output_dir", str(folder), "--corpus", str(TRAIN_TXT),
                           "--context", "64"]) == 0
    return folder


# Independent checkers: each re-derives the answer from the instruction and the raw corpus lines.

def speeches_starting_with(speaker, words):
    candidates = SPEECHES_BY_FIRST_WORDS.get(tuple(words.split()[:3]), [])
    return {doc for doc in candidates if doc.startswith(f"{speaker}: ") and (doc + " ").startswith(
        f"{speaker}: {words} ")}


def arithmetic_answer(instruction):
    match = re.fullmatch(r"计算 (\d+) \+ (\d+) = \?", instruction)
    a, b = int(match.group(1)), int(match.group(2))
    assert 0 <= a <= 99 and 0 <= b <= 99
    return {str(a + b)}


def parse_next_line(instruction):
    a, b, c, asked = re.fullmatch(r"(\w+)，(\w+)，(\w+)。(\w+)的下一句？", instruction).groups()
    return [a, b, c], asked


def next_line_answer(instruction):
    lines, asked = parse_next_line(instruction)
    assert source_poems(instruction) or all(POEMS_BY_LINE.get(line) for line in lines), instruction
    return {lines[i + 1] for i in range(2) if lines[i] == asked}


def line_sources(instruction):
    """The poems each line of an excerpt comes from (a mixed train excerpt takes its lines from several)."""
    lines, _ = parse_next_line(instruction)
    return set().union(*(POEMS_BY_LINE.get(line, set()) for line in lines))


def source_poems(instruction):
    """The poems that have the excerpt's lines consecutively, each closed by punctuation."""
    lines, _ = parse_next_line(instruction)
    found = set()
    for doc in POEMS_BY_LINE.get(lines[0], ()):  # a source has the first line as a whole clause
        clauses = POEM_CLAUSES[doc]  # the last clause is what follows the final punctuation
        if any(clauses[i:i + 3] == lines for i in range(len(clauses) - 3)):
            found.add(doc)
    return found


def parse_author(instruction):
    return re.fullmatch(r"(《[^》]+》\S*)\n(\S+?)：(\w+)\n作者是？", instruction).groups()


def author_answer(instruction):
    title, author, first = parse_author(instruction)
    return {author} if source_heading(instruction) else set()


def source_heading(instruction):
    title, author, first = parse_author(instruction)
    heading = f"{title} {author}：{first}"
    pattern = re.compile(rf"{re.escape(heading)}(?:{PUNCT}|$)")
    return {doc for doc in POEM_DOCS if doc.startswith(heading) and pattern.match(doc)}


def parse_speaker(instruction):
    return re.fullmatch(r'(.+?): (.+)\n(.+?): (.+)\nWho says "(.+)"\?', instruction).groups()


def speaker_answer(instruction):
    first, first_words, second, second_words, quote = parse_speaker(instruction)
    assert source_speeches(instruction), instruction
    return {name for name, words in ((first, first_words), (second, second_words))
            if (words + " ").startswith(quote + " ")}


def source_speeches(instruction):
    """The two consecutive corpus speeches an exchange shows."""
    first, first_words, second, second_words, _ = parse_speaker(instruction)
    firsts = speeches_starting_with(first, first_words)
    seconds = speeches_starting_with(second, second_words)
    adjacent = any(i + 1 in CORPUS_INDEX[s] for f in firsts for s in seconds for i in CORPUS_INDEX[f])
    return firsts | seconds if adjacent else set()


POEM_CLAUSES = {doc: re.split(PUNCT, doc.split("：", 1)[1]) for doc in POEM_DOCS}  # a poem's body, split
POEMS_BY_LINE = {}  # a poem line (a clause between punctuation) -> the poems that have it
for _doc, _clauses in POEM_CLAUSES.items():
    for _clause in _clauses:
        POEMS_BY_LINE.setdefault(_clause, set()).add(_doc)
CORPUS_INDEX = {}  # line -> every index it has in the corpus (a few speeches repeat)
for _i, _line in enumerate(CORPUS):
    CORPUS_INDEX.setdefault(_line, set()).add(_i)
CHECKERS = {"arithmetic": arithmetic_answer, "poem_next_line": next_line_answer, "poem_author": author_answer,
            "speaker": speaker_answer}


def source_documents(record):
    """The corpus lines a corpus-family prompt was built from."""
    ins = record["instruction"]
    if record["task"] == "poem_next_line":
        return source_poems(ins) or line_sources(ins)
    if record["task"] == "poem_author":
        return source_heading(ins)
    return source_speeches(ins)


def test_same_seed_gives_identical_files_and_matches_the_committed_data(built, tmp_path):
    for name in FILES:  # the committed files were built by another process: the same seed, the same bytes
        assert (ROOT / "data" / "sft" / name).read_bytes() == (built / name).read_bytes(), f"rebuild data/sft/{name}"
    other = tmp_path / "seed1"
    build_sft.main(["--seed", "1", "--output_dir", str(other), "--corpus", str(TRAIN_TXT)])
    assert load(other, "sft_data.json") != load(built, "sft_data.json")


def single(records: list[dict]) -> list[dict]:
    """The single-turn records (the dialogues are checked on their own)."""
    return [r for r in records if "messages" not in r]


def test_no_prompt_or_source_document_in_both_train_and_test(built):
    train = single(load(built, "sft_data.json")) + load(built, "rlhf_pairwise.json")
    test = load(built, "sft_test.json") + load(built, "rlhf_pairwise_test.json")
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in test}
    train_docs = set().union(*(source_documents(r) for r in train if r["task"] != "arithmetic"))
    test_docs = set().union(*(source_documents(r) for r in test if r["task"] != "arithmetic"))
    assert train_docs and test_docs and not train_docs & test_docs


def test_sft_answers_are_the_unique_correct_answer(built):
    for name in ("sft_data.json", "sft_test.json"):
        records = single(load(built, name))
        assert {r["task"] for r in records} == set(CHECKERS)
        assert len({r["instruction"] for r in records}) == len(records)
        for r in records:
            assert set(r) == {"instruction", "response", "task"}
            assert CHECKERS[r["task"]](r["instruction"]) == {r["response"]}, r


def test_preference_pairs_choose_the_right_answer_and_reject_a_wrong_one(built):
    for name, sft_name in (("rlhf_pairwise.json", "sft_data.json"), ("rlhf_pairwise_test.json", "sft_test.json")):
        pairs, sft = load(built, name), single(load(built, sft_name))
        assert {r["instruction"] for r in pairs} <= {r["instruction"] for r in sft}
        assert {r["instruction"] for r in pairs if r["task"] != "arithmetic"} == {
            r["instruction"] for r in sft if r["task"] != "arithmetic"}
        for r in pairs:
            assert set(r) == {"instruction", "chosen", "rejected", "task"}
            answers = CHECKERS[r["task"]](r["instruction"])
            assert r["chosen"] in answers and r["rejected"] not in answers and r["rejected"], r


def test_near_miss_sums_are_plus_minus_one_or_ten_or_truncated(built):
    for r in load(built, "rlhf_pairwise.json"):
        if r["task"] == "arithmetic":
            chosen, rejected = int(r["chosen"]), int(r["rejected"])
            assert abs(chosen - rejected) in (1, 10) or r["chosen"][:-1] == r["rejected"]


def dialogue_turns(messages: list[dict]) -> list[tuple[str, str | None, str, int]]:
    """(user text, calculator expression or None, answer, weight) per turn, checking the message shapes."""
    turns = []
    for m in messages:
        if m["role"] == "user":
            turns.append([m["content"], None, None, 1])
        elif m["role"] == "assistant" and m.get("tool_calls"):
            (call,) = m["tool_calls"]
            assert call["function"]["name"] == "calculator" and m["content"] is None
            turns[-1][1] = json.loads(call["function"]["arguments"])["expression"]
        elif m["role"] == "tool":
            assert turns[-1][1] is not None and m["tool_call_id"] == "call_0"
            assert m["content"] == evaluate(turns[-1][1])  # the tool's result is the calculator's
        else:
            turns[-1][2], turns[-1][3] = m["content"], m.get("weight", 1)
    return [tuple(t) for t in turns]


@pytest.mark.parametrize("build", ["built", "built_windows"])
def test_dialogues_follow_up_on_their_own_earlier_answers(build, request):
    built = request.getfixturevalue(build)
    whole = build == "built"
    train_sums = {r["instruction"] for r in single(load(built, "sft_data.json")) if r["task"] == "arithmetic"}
    test_sums = {r["instruction"] for r in load(built, "sft_test.json") if r["task"] == "arithmetic"}
    files = (("sft_data.json", train_sums), ("chat_test.json", test_sums))
    for name, sums in files if whole else files[:1]:  # a 64-token model has no four-turn test dialogue
        dialogues = [r for r in load(built, name) if "messages" in r]
        assert {r["task"] for r in dialogues} == {"arithmetic_chat", "author_chat"}
        for r in dialogues:
            turns = dialogue_turns(r["messages"])
            users, answers = [t[0] for t in turns], [t[2] for t in turns]
            if r["task"] == "arithmetic_chat" and users[0] in sums:  # a whole dialogue, or its first window
                assert arithmetic_answer(users[0]) == {answers[0]} and turns[0][1] is None
                total = int(answers[0])
            elif r["task"] == "arithmetic_chat":  # a train window: the turn before is context only
                assert name == "sft_data.json" and users[0].startswith(("再加", "再减")) and turns[0][3] == 0
                sign = 1 if users[0].startswith("再加") else -1
                total = int(answers[0]) - sign * int(re.search(r"\d+", users[0])[0])
                users, answers, turns = [f"计算 {total} + 0 = ?", *users], [str(total), *answers], [None, *turns]
            if r["task"] == "arithmetic_chat":
                for follow_up, answer, turn in zip(users[1:], answers[1:], turns[1:]):
                    sign = (1, "+") if follow_up.startswith("再加") else (-1, "-")
                    n = int(re.search(r"\d+", follow_up)[0])
                    expression = f"{total}{sign[1]}{n}"  # the call reads the running total off the last answer
                    total += sign[0] * n
                    assert answer == str(total) and total >= 0
                    assert turn[1] == (expression if name == "sft_data.json" else None)
                # a whole dialogue: four turns; a window: two (the first) or one after its context turn (+ its start)
                assert len(answers) in ((4,) if name == "chat_test.json" or whole else (2, 3))
            else:
                assert author_answer(users[0]) == {answers[0]} and users[1] == "这位诗人姓什么？"
                assert answers[0].startswith(answers[1]) and len(answers[1]) in (1, 2)
    chats = [r for r in load(built, "sft_data.json") if r["task"] == "arithmetic_chat"]
    fits = build_sft.dialogue_fit(build_sft.context_tokenizer(TRAIN_TXT), 256 if whole else 64)
    assert all(fits(r) for r in chats) and all(fits(r) for r in load(built, "chat_test.json"))
    # the default context holds every whole dialogue; at 64 tokens each is its windows (those that fit)
    expected = (build_sft.Sizes.chat_sums_train,) if whole else range(2 * build_sft.Sizes.chat_sums_train,
                                                                       3 * build_sft.Sizes.chat_sums_train + 1)
    assert len(chats) in expected
    assert len(load(built, "chat_test.json")) > (300 if whole else 40)


def test_the_plain_form_builds_the_dialogues_without_calls(tmp_path):
    build_sft.main(["--arithmetic_chat_form", "plain", "--chat_sums_train", "50", "--output_dir", str(tmp_path),
                    "--corpus", str(TRAIN_TXT)])
    chats = [r for r in load(tmp_path, "sft_data.json") if r["task"] == "arithmetic_chat"]
    assert len(chats) == 50 and all([m["role"] for m in r["messages"]] == ["user", "assistant"] * 4 for r in chats)


def test_counts_per_family(built):
    counts = {}
    for r in load(built, "sft_data.json"):
        counts[r["task"]] = counts.get(r["task"], 0) + 1
    assert counts["arithmetic"] == 9500 and counts["speaker"] == 4000
    assert counts["poem_next_line"] > 800 + 6000 and counts["poem_author"] > 250
    assert sum(1 for r in load(built, "sft_test.json") if r["task"] == "arithmetic") == 500
    assert sum(1 for r in load(built, "rlhf_pairwise_test.json") if r["task"] == "arithmetic") == 500


def test_rl_prompts_are_sums_no_other_file_holds_and_the_test_files_stay_the_same(built, tmp_path):
    assert not (built / "rlvf_prompts.json").exists()  # only when asked for
    build_sft.main(["--arithmetic_rl", "5500", "--output_dir", str(tmp_path), "--corpus", str(TRAIN_TXT)])
    rl = load(tmp_path, "rlvf_prompts.json")
    assert len(rl) == len({r["instruction"] for r in rl}) == 5500
    for r in rl:
        assert r["task"] == "arithmetic" and arithmetic_answer(r["instruction"]) == {r["response"]}, r
    assert not {r["instruction"] for r in rl} & {r["instruction"] for name in FILES
                                                  for r in single(load(tmp_path, name))}
    for name in ("sft_test.json", "rlhf_pairwise_test.json"):
        assert (tmp_path / name).read_bytes() == (built / name).read_bytes(), name
    sft_sums = {r["instruction"] for r in load(tmp_path, "sft_data.json") if r["task"] == "arithmetic"}
    assert len(sft_sums) == 4000
    assert sft_sums | {r["instruction"] for r in rl} == {
        r["instruction"] for r in load(built, "sft_data.json") if r["task"] == "arithmetic"}
    build_sft.main(["--output_dir", str(tmp_path), "--corpus", str(TRAIN_TXT)])  # back to the default
    assert not (tmp_path / "rlvf_prompts.json").exists()  # its sums are SFT data again: no stale RL prompts


def test_test_excerpts_are_real_and_train_adds_mixed_ones_from_train_poems_only(built):
    test = [r for r in load(built, "sft_test.json") if r["task"] == "poem_next_line"]
    assert test and all(source_poems(r["instruction"]) for r in test)  # held out: consecutive lines of one poem
    train = [r for r in load(built, "sft_data.json") if r["task"] == "poem_next_line"]
    mixed = [r for r in train if not source_poems(r["instruction"])]
    assert len(mixed) == 2 * build_sft.Sizes.mixed_excerpts_train
    test_poems = set().union(*(source_poems(r["instruction"]) for r in test))
    assert not set().union(*(line_sources(r["instruction"]) for r in mixed)) & test_poems
    pairs = {r["instruction"] for r in load(built, "rlhf_pairwise.json") if r["task"] == "poem_next_line"}
    assert {r["instruction"] for r in mixed} <= pairs  # and each is a preference pair too


def test_train_pairs_hold_every_wrong_answer_of_every_train_sum_once(built):
    expected = set()
    for r in load(built, "sft_data.json"):
        if r["task"] == "arithmetic":
            total = int(r["response"])
            wrong = {str(total + d) for d in (-10, -1, 1, 10) if total + d >= 0} | ({str(total)[:-1]} - {""})
            expected |= {(r["instruction"], w) for w in wrong}
    pairs = [(r["instruction"], r["rejected"]) for r in load(built, "rlhf_pairwise.json") if r["task"] == "arithmetic"]
    assert len(pairs) == len(set(pairs)) and set(pairs) == expected


@pytest.mark.slow
def test_every_example_fits_the_default_64_token_context(built):
    from pretrain_trainer import PretrainOptions
    from prompts import SFT_TEMPLATE

    assert build_sft.VOCAB_SIZE == PretrainOptions().vocab_size  # what pretrain_trainer.py trains by default
    tokenizer = build_sft.context_tokenizer(TRAIN_TXT)
    for name in FILES:
        for r in load(built, name):
            for answer in {r.get("response"), r.get("chosen"), r.get("rejected")} - {None}:
                text = SFT_TEMPLATE.format(instruction=r["instruction"], response=answer)
                assert len(tokenizer.encode_ordinary(text)) + 2 <= 64, text  # + <s> and </s>


def test_missing_corpus_is_a_one_line_error(tmp_path, capsys):
    assert build_sft.main(["--corpus", str(tmp_path / "missing.txt"), "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: corpus file") and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_too_many_rl_sums_is_a_one_line_error(tmp_path, capsys):
    assert build_sft.main(["--arithmetic_rl", "7600", "--output_dir", str(tmp_path), "--corpus", str(TRAIN_TXT)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --arithmetic_rl 7600 leaves fewer train sums than --pairwise_arithmetic 2000: ask for at " \
                  "most 7500" and not (tmp_path / "sft_data.json").exists()


def test_too_many_sums_is_a_one_line_error(tmp_path, capsys):
    code = build_sft.main(["--arithmetic_train", "9800", "--output_dir", str(tmp_path), "--corpus", str(TRAIN_TXT)])
    assert code == 2
    assert capsys.readouterr().err.startswith("error: only 10000 distinct sums")


def test_flags_become_the_sizes_they_name():
    args = build_sft.build_parser().parse_args(["--arithmetic_train", "1", "--arithmetic_test", "2", "--arithmetic_rl",
                                                "0", "--pairwise_arithmetic", "1", "--speaker_train", "5",
                                                "--speaker_test", "6", "--mixed_excerpts_train", "7",
                                                "--one_wrong_answer_per_sum"])
    assert build_sft.sizes_of(args) == build_sft.Sizes(arithmetic_train=1, arithmetic_test=2, arithmetic_rl=0,
                                                       pairwise_arithmetic=1, speaker_train=5, speaker_test=6,
                                                       mixed_excerpts_train=7, all_wrong_sums=False)
    assert build_sft.sizes_of(build_sft.build_parser().parse_args([])) == build_sft.Sizes()
