"""inference.export, proved by the peers themselves: the Hugging Face folder (GPT-2, Llama or Qwen3) loads in
transformers with our logits, greedy tokens and token ids; the GGUF file reads back with the gguf package (and runs in
llama.cpp when llama-cpp-python is installed); round trips are bit-identical, and an exported folder loads back
wherever a checkpoint does; bad input is one line and overwrites nothing."""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

import gguf
import pytest
import torch
import transformers

import lora
import checkpoints
from checkpoints import load_model, save_checkpoint
from conftest import SAMPLE_ZH, corpus_lines
from decoding import SamplingParams, generate
from gpt_model import GPTConfig, GPTModel
from inference import export
from model_heads import GPTClassifier, GPTRewardModel
from prompts import CHAT_TEMPLATE, CHAT_TEMPLATE_NO_TOOLS, SFT_TEMPLATE, render_prompt, render_sample
from quantization import quantize_model_int8

pytestmark = pytest.mark.usefixtures("one_thread")
TEXTS = [*corpus_lines(limit=40), *SAMPLE_ZH.read_text(encoding="utf-8").splitlines()[:20],
         "emoji 😀👍🏽 and a tab\tand  two spaces", "specials in text: <s> </s> <pad> <unk>", "   leading spaces",
         "naïve café — ‘quotes’"]


@pytest.fixture()
def run(tiny_tokenizer, tmp_path) -> Path:
    tiny_tokenizer.save(tmp_path / "tokenizer")
    return tmp_path


def save(run: Path, model: torch.nn.Module, tokenizer, name: str = "model.pth", **extra) -> Path:
    save_checkpoint(run / name, model, tokenizer_fingerprint=tokenizer.fingerprint, **extra)
    return run / name


def exported(checkpoint: Path, fmt: str, output: Path, *flags: str) -> Path:
    assert export.main(["--model_path", str(checkpoint), "--format", fmt, "--output", str(output), *flags]) == 0
    return output


def prompt(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode_ordinary(text)]])


def assert_same_as_transformers(hf, model, tiny_tokenizer) -> None:
    """transformers' logits within 1e-4 of ours and the same 24 greedy tokens."""
    ids = prompt(tiny_tokenizer, "ROMEO: But, soft! what light through yonder window breaks?")
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)["logits"]).abs().max() < 1e-4
    ours = generate(model, ids, SamplingParams(max_new_tokens=24, do_sample=False))
    theirs = hf.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None,
                         pad_token_id=tiny_tokenizer.pad_token_id)
    assert torch.equal(ours, theirs)


def trained_on_the_embedded_corpus(tokenizer, steps: int = 60, preset: str = "tiny", **overrides) -> GPTModel:
    """A tiny model that has learned something of the embedded corpus (its logits are far from uniform)."""
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset(preset, vocab_size=len(tokenizer), max_seq_len=64, **overrides))
    stream = torch.tensor([t for line in corpus_lines(limit=600) for t in tokenizer.encode_ordinary(line + "\n")])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - 32, (16,))
        windows = torch.stack([stream[i:i + 32] for i in starts])
        loss = model(windows, labels=windows)["loss"]  # shifted inside, as transformers does
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.parametrize("shape", ["trained tiny", "random gpt2 (124M)"])
def test_transformers_loads_the_hf_folder_with_our_logits_and_greedy_tokens(run, tiny_tokenizer, shape):
    torch.manual_seed(0)
    if shape == "trained tiny":
        model = trained_on_the_embedded_corpus(tiny_tokenizer)
    else:
        model = GPTModel(GPTConfig.from_preset("gpt2", vocab_size=50257, max_seq_len=64)).eval()
    folder = exported(save(run, model, tiny_tokenizer), "hf", run / "hf")
    assert {"config.json", "generation_config.json", "model.safetensors", "vocab.json", "merges.txt",
            "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    assert (folder / "model.safetensors").stat().st_mode & 0o044 == 0o044  # others can read it (a container's user)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert_same_as_transformers(hf, model, tiny_tokenizer)


def test_autotokenizer_gives_our_ids(run, tiny_tokenizer):
    model = GPTModel(GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), max_seq_len=64))
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported(save(run, model, tiny_tokenizer), "hf", run / "hf"))
    for text in TEXTS:  # special tokens written in text: plain bytes in ours, split_special_tokens in theirs
        assert tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == \
            tiny_tokenizer.encode_ordinary(text), text
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == \
            tiny_tokenizer.encode(text, allowed_special="all", add_special_tokens=False)["input_ids"], text
        assert tokenizer.decode(tiny_tokenizer.encode_ordinary(text)) == text
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == \
        ("<s>", "</s>", "<pad>", "<unk>")


CONVERSATIONS = [
    [{"role": "user", "content": "计算 15 + 27 = ?"}, {"role": "assistant", "content": "42"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "ROMEO: who is there?"},
     {"role": "assistant", "content": "JULIET."}, {"role": "user", "content": "再加 8 呢？ and  two spaces\tend"},
     {"role": "assistant", "content": "50 😀"}],
    [{"role": "developer", "content": "No rhymes."}, {"role": "user", "content": "naïve café"},
     {"role": "assistant", "content": ""}, {"role": "user", "content": "   leading spaces"},
     {"role": "assistant", "content": "ok"}],
]


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, CHAT_TEMPLATE_NO_TOOLS, SFT_TEMPLATE],
                         ids=["chat", "chat_before_tools", "instruction"])
def test_apply_chat_template_on_the_exported_files_gives_our_ids(run, tiny_tokenizer, template):
    model = GPTModel(GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), max_seq_len=64))
    folder = exported(save(run, model, tiny_tokenizer, sft_template=template), "hf", run / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    for conversation in CONVERSATIONS:
        if template == SFT_TEMPLATE and conversation[0]["role"] == "developer":
            continue  # the older format joins a turn's messages; its Jinja covers alternating turns
        prompt = conversation[:-1]
        theirs = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert theirs == render_prompt(tiny_tokenizer, prompt, template).ids
        whole = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False)
        assert whole == render_sample(tiny_tokenizer, conversation, template, max_seq_len=10_000).input_ids
    gguf_file = exported(run / "model.pth", "gguf", run / "model.gguf")
    assert gguf.GGUFReader(gguf_file).fields["tokenizer.chat_template"].contents() == tokenizer.chat_template
    pretrained = exported(save(run, model, tiny_tokenizer, name="pretrained.pth"), "hf", run / "hf_pretrained")
    assert transformers.AutoTokenizer.from_pretrained(pretrained).chat_template is None  # no format learned yet


CALCULATOR_TOOL = {"type": "function", "function": {
    "name": "calculator", "description": "evaluate arithmetic",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}


def call(name: str, arguments, call_id: str = "call_0") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


TOOL_CONVERSATIONS = [  # OpenAI's shapes: arguments as a JSON string (any spacing) or as a dict (transformers' docs)
    [{"role": "user", "content": "计算 15 + 27 = ?"}, {"role": "assistant", "content": "42"},
     {"role": "user", "content": "再加 8 呢？"},
     {"role": "assistant", "content": None, "tool_calls": [call("calculator", '{"expression": "42+8"}')]},
     {"role": "tool", "tool_call_id": "call_0", "content": "50"}, {"role": "assistant", "content": "50"}],
    [{"role": "system", "content": "Use the tool."}, {"role": "user", "content": "(3 - 5) * 7 / 2?"},
     {"role": "assistant", "content": "Let me see.", "tool_calls": [
         call("calculator", '{ "expression" :"(3 - 5) * 7 / 2"}'), call("calculator", {"expression": "1/0"}, "b"),
         call("get_weather", '{"city": "Paris"}', "c")]},
     {"role": "tool", "tool_call_id": "call_0", "content": "-7"},
     {"role": "tool", "tool_call_id": "b", "content": "error: division by zero"},
     {"role": "tool", "tool_call_id": "c", "content": "sunny"}, {"role": "assistant", "content": "-7, sunny"}],
    [{"role": "user", "content": "再减 5 呢？"}, {"role": "assistant", "content": "<|tool_call|>50-5<|/tool_call|>"
                                                                             "<|tool_result|>45<|/tool_result|>45"}],
]


def test_apply_chat_template_with_tool_calls_and_tools_gives_our_ids(run, tiny_tokenizer):
    model = GPTModel(GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), max_seq_len=64))
    folder = exported(save(run, model, tiny_tokenizer, sft_template=CHAT_TEMPLATE), "hf", run / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    for conversation in TOOL_CONVERSATIONS:
        for end in [n for n, m in enumerate(conversation) if m["role"] in ("user", "tool")]:
            prompt = conversation[:end + 1]  # after a tool's result the model continues its turn (no cue)
            theirs = tokenizer.apply_chat_template(prompt, tools=[CALCULATOR_TOOL], add_generation_prompt=True,
                                                   tokenize=True, return_dict=False)
            assert theirs == render_prompt(tiny_tokenizer, prompt, CHAT_TEMPLATE).ids
        whole = tokenizer.apply_chat_template(conversation, tools=[CALCULATOR_TOOL], tokenize=True, return_dict=False)
        assert whole == render_sample(tiny_tokenizer, conversation, CHAT_TEMPLATE, max_seq_len=10_000).input_ids
    # a model trained before tool calls keeps its own template in the export
    old = exported(save(run, model, tiny_tokenizer, sft_template=CHAT_TEMPLATE_NO_TOOLS, name="old.pth"), "hf",
                   run / "hf_old")
    assert transformers.AutoTokenizer.from_pretrained(old).chat_template == CHAT_TEMPLATE_NO_TOOLS


def digest(state: dict[str, torch.Tensor]) -> dict[str, str]:
    return {k: hashlib.sha256(v.contiguous().numpy().tobytes()).hexdigest() for k, v in state.items()}


def test_round_trips_are_bit_identical(run, tiny_tokenizer, tmp_path):
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), max_seq_len=64))
    back = load_model(exported(save(run, model, tiny_tokenizer), "hf", run / "hf"))
    assert digest(back.state_dict()) == digest(model.state_dict())  # ours -> HF -> ours
    config = transformers.GPT2Config(vocab_size=len(tiny_tokenizer), n_positions=64, n_embd=64, n_layer=2, n_head=2)
    hf = transformers.GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path / "original")
    imported = load_model(tmp_path / "original")
    again = transformers.GPT2LMHeadModel.from_pretrained(exported(save(run, imported, tiny_tokenizer, "imported.pth"),
                                                                  "hf", run / "again"))
    original = {k: v for k, v in hf.state_dict().items() if not k.endswith(".attn.bias")}
    # HF -> ours -> HF
    assert digest(original) == digest({k: v for k, v in again.state_dict().items() if k in original})


def test_a_classifier_exports_as_sequence_classification_with_its_labels(run, tiny_tokenizer):
    torch.manual_seed(0)
    config = GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), max_seq_len=64)
    classifier = GPTClassifier(config, 3, ["comedy", "history", "tragedy"]).eval()
    with torch.no_grad():
        classifier.head.weight.normal_(std=1.0)  # labels that differ between texts
    checkpoint = save(run, classifier, tiny_tokenizer, model_class="classify", labels=classifier.labels)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(exported(checkpoint, "hf", run / "hf")).eval()
    assert hf.config.id2label == {0: "comedy", 1: "history", 2: "tragedy"}
    rows = [[tiny_tokenizer.bos_token_id, *tiny_tokenizer.encode_ordinary(t)[:40], tiny_tokenizer.eos_token_id]
            for t in TEXTS[:12]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tiny_tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    mask = (torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
    with torch.no_grad():
        ours, theirs = classifier(ids, attention_mask=mask), hf(ids, attention_mask=mask).logits
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1)) and len(set(ours.argmax(-1).tolist())) > 1
    assert (ours - theirs).abs().max() < 1e-4


def test_int8_exports_dequantized_and_lora_merged(run, tiny_tokenizer):
    torch.manual_seed(0)
    config = GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), max_seq_len=64)
    int8 = quantize_model_int8(GPTModel(config).eval())
    back = load_model(exported(save(run, int8, tiny_tokenizer, "int8.pth"), "hf", run / "int8"))
    head = int8.lm_head
    assert torch.equal(back.lm_head.weight, head.weight.float() * head.scale[:, None])
    ids = prompt(tiny_tokenizer, "LEAR: Attend the lords")
    with torch.no_grad():
        assert (back(ids)["logits"] - int8(ids)["logits"]).abs().max() < 0.05  # FBGEMM also rounds activations
    adapted = lora.apply_lora(GPTModel(config), ["c_attn"], r=2, alpha=4.0)
    with torch.no_grad():
        for layer in lora.lora_layers(adapted).values():
            layer.lora_B.normal_()
    checkpoint = save(run, adapted, tiny_tokenizer, "lora.pth", lora=lora.lora_config(adapted))
    merged = load_model(exported(checkpoint, "hf", run / "lora"))
    with torch.no_grad():
        assert (merged(ids)["logits"] - adapted.eval()(ids)["logits"]).abs().max() < 1e-4


@pytest.mark.parametrize("kind, matrix_type", [("f32", "F32"), ("f16", "F16"), ("q8_0", "Q8_0")])
def test_the_gguf_file_holds_gpt2_tensors_and_our_tokenizer(run, tiny_tokenizer, kind, matrix_type):
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), max_seq_len=64)).eval()
    path = exported(save(run, model, tiny_tokenizer), "gguf", run / "model.gguf", "--type", kind)
    reader = gguf.GGUFReader(path)
    field = lambda name: reader.fields[name].contents()  # noqa: E731
    assert field("general.architecture") == "gpt2" and field("tokenizer.ggml.model") == "gpt2"
    assert field("tokenizer.ggml.pre") == "gpt-2" and field("gpt2.block_count") == model.config.n_layers
    assert field("gpt2.embedding_length") == 128 and field("gpt2.context_length") == 64
    tokens = field("tokenizer.ggml.tokens")
    assert tokens[:4] == ["<s>", "<pad>", "</s>", "<unk>"] and len(tokens) == model.config.vocab_size
    assert field("tokenizer.ggml.merges") == [f"{a} {b}" for a, b in tiny_tokenizer.merges]
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")) == (0, 2)
    assert field("tokenizer.ggml.add_bos_token") is True and field("tokenizer.ggml.add_eos_token") is False
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 4 + 12 * model.config.n_layers + 1
    qkv = tensors["blk.0.attn_qkv.weight"]
    assert qkv.tensor_type.name == matrix_type and list(qkv.shape) == [128, 384]  # ggml order: (in, out)
    assert tensors["blk.0.attn_qkv.bias"].tensor_type.name == "F32"
    expected = model.transformer.h[0].attn.c_attn.weight.detach().numpy()
    values = gguf.quants.dequantize(qkv.data, qkv.tensor_type).reshape(expected.shape)
    tolerance = {"f32": 0, "f16": 1e-3, "q8_0": 2e-3}[kind]
    assert abs(values - expected).max() <= tolerance


def test_bad_input_is_one_line_and_overwrites_nothing(run, tiny_tokenizer, capsys):
    config = GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), max_seq_len=64)
    model = save(run, GPTModel(config), tiny_tokenizer)
    reward = save(run, GPTRewardModel(config, likelihood=True), tiny_tokenizer, "reward.pth", model_class="reward")
    classifier = save(run, GPTClassifier(config, 2, ["a", "b"]), tiny_tokenizer, "classify.pth",
                      model_class="classify", labels=["a", "b"])
    mixed = save(run, GPTModel(GPTConfig.from_dict({**config.to_dict(), "pos_embedding": "rope"})), tiny_tokenizer,
                 "mixed.pth")  # rotary positions with LayerNorm and GELU: no runtime's architecture
    (run / "kept").mkdir()
    (run / "kept" / "notes.txt").write_text("mine")
    checkpoint_bytes = model.read_bytes()
    (run / "junk.pth").write_bytes(b"not a checkpoint")
    cases = [(["--model_path", str(run / "junk.pth"), "--format", "hf", "--output", str(run / "x")], "corrupt"),
             (["--model_path", str(model), "--format", "hf", "--output", str(run / "kept")], "already exists"),
             (["--model_path", str(reward), "--format", "hf", "--output", str(run / "x")], "is a reward model"),
             (["--model_path", str(classifier), "--format", "gguf", "--output", str(run / "c.gguf")], "--format hf"),
             (["--model_path", str(model), "--format", "hf", "--output", str(run / "x"), "--type", "q8_0"],
              "--type applies to --format gguf"),
             (["--model_path", str(model), "--format", "gguf", "--output", str(run / "kept")], "already exists"),
             (["--model_path", str(model), "--format", "onnx", "--output", str(run / "x")], "invalid choice"),
             (["--model_path", str(mixed), "--format", "hf", "--output", str(run / "x")], "neither GPT-2 nor Llama"),
             (["--model_path", str(mixed), "--format", "gguf", "--output", str(run / "c.gguf")], "norm='rmsnorm'"),
             (["--model_path", str(model), "--format", "hf"], "required"),
             (["--model_path", str(model), "--format", "gguf", "--output", str(model), "--overwrite"],
              "would replace"),
             (["--model_path", str(model), "--format", "hf", "--output", str(run), "--overwrite"], "would replace"),
             (["--model_path", str(model), "--format", "hf", "--output", str(run / "tokenizer"), "--overwrite"],
              "would replace")]
    for argv, message in cases:
        assert export.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, (argv, err)
    assert not (run / "x").exists() and not (run / "c.gguf").exists()
    assert (run / "tokenizer" / "vocab.json").exists() and model.read_bytes() == checkpoint_bytes
    assert [p.name for p in (run / "kept").iterdir()] == ["notes.txt"] and (run / "kept" / "notes.txt").read_text() == \
        "mine"
    exported(model, "hf", run / "kept", "--overwrite")  # asked for: replaced as a whole
    assert not (run / "kept" / "notes.txt").exists() and (run / "kept" / "config.json").exists()


@pytest.mark.parametrize("fmt, name, left", [
    ("hf", "hf", r"\.hf\.\d+\.tmpdir"),  # killed with the folder's files written, before its rename
    ("gguf", "m.gguf", r"\.m\.gguf\.\d+\.tmp"),
])
def test_the_temporary_files_of_an_export_killed_mid_write_are_removed_by_the_next_one(fmt, name, left, run,
                                                                                      tiny_tokenizer):
    """kill -9 mid-export leaves the write's temporary file or folder; the next successful export removes it, as the
    trainers' next start does (atomic_file.remove_stale_temps)."""
    import re

    from cli_cases import run_killed_in, temp_files

    model = save(run, GPTModel(GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), max_seq_len=64)),
                 tiny_tokenizer)
    output = run / "exports" / name
    argv = ["--model_path", str(model), "--format", fmt, "--output", str(output)]
    killed = run_killed_in("os.fsync", "inference.export", argv)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [n for n in temp_files(output.parent) if re.fullmatch(left, n)], temp_files(output.parent)
    exported(model, fmt, output)
    assert temp_files(output.parent) == [] and [p.name for p in output.parent.iterdir()] == [name]


LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.mark.skipif(not LLAMA_CPP, reason="llama-cpp-python is not installed (it builds llama.cpp from source, "
                                          "~6-10 minutes on 2 cores): pip install 'llama-cpp-python[server]'")
@pytest.mark.parametrize("kind", ["f32", "f16"])
def test_llama_cpp_runs_our_gguf_with_our_tokens(run, tiny_tokenizer, kind):
    from llama_cpp import Llama

    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), max_seq_len=64)).eval()
    path = exported(save(run, model, tiny_tokenizer), "gguf", run / "model.gguf", "--type", kind)
    llm = Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False)
    for text in ("ROMEO: But, soft!", "《静夜思》 李白：", "LEAR: Attend the lords of France"):
        ids = [tiny_tokenizer.bos_token_id, *tiny_tokenizer.encode_ordinary(text)]
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == ids[1:]
        assert llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) == ids  # the file asks for <s>
        theirs = []
        for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
            theirs.append(token)
            if len(theirs) == 16:
                break
        greedy = SamplingParams(max_new_tokens=16, do_sample=False)
        ours = generate(model, torch.tensor([ids]), greedy)[0, len(ids):].tolist()
        assert theirs == ours, text


# ----------------------------------------------------------------------------- the modern shape: Llama and Qwen3

MODERN = {"qwen3": {},  # modern-tiny: rope + rmsnorm + qk_norm + swiglu + GQA, no biases: Qwen3
          "llama": dict(qk_norm=False, tie_embeddings=False, bias=True)}


@pytest.mark.parametrize("arch", MODERN)
def test_the_modern_shape_exports_as_llama_or_qwen3_with_our_logits_and_greedy_tokens(run, tiny_tokenizer, arch):
    model = trained_on_the_embedded_corpus(tiny_tokenizer, steps=40, preset="modern-tiny", **MODERN[arch])
    folder = exported(save(run, model, tiny_tokenizer), "hf", run / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert type(hf).__name__ == {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}[arch]
    assert hf.config.num_key_value_heads == 2 and hf.config.tie_word_embeddings == model.config.tie_embeddings
    assert_same_as_transformers(hf, model, tiny_tokenizer)


@pytest.mark.parametrize("arch", MODERN)
def test_an_exported_folder_loads_back_wherever_a_checkpoint_does(run, tiny_tokenizer, arch):
    torch.manual_seed(0)
    config = GPTConfig.from_preset("modern-tiny", vocab_size=len(tiny_tokenizer), max_seq_len=64, **MODERN[arch])
    model = GPTModel(config).eval()
    folder = exported(save(run, model, tiny_tokenizer, sft_template=CHAT_TEMPLATE), "hf", run / "hf")
    back = load_model(folder)
    assert back.config == config
    assert digest(back.state_dict()) == digest(model.state_dict())  # ours -> HF -> ours
    loaded = checkpoints.load(folder, trainable=True, expect="lm", flag="--pretrained_model")
    assert loaded.tokenizer.fingerprint == tiny_tokenizer.fingerprint and loaded.template == CHAT_TEMPLATE
    ids = prompt(tiny_tokenizer, "LEAR: Attend the lords")
    with torch.no_grad():
        assert torch.equal(loaded.model(ids)["logits"], model(ids)["logits"])
    assert "Qwen3ForCausalLM" in checkpoints.describe(folder) or arch == "llama"


def test_a_modern_classifier_exports_as_qwen3_sequence_classification(run, tiny_tokenizer):
    torch.manual_seed(0)
    config = GPTConfig.from_preset("modern-tiny", vocab_size=len(tiny_tokenizer), max_seq_len=64)
    classifier = GPTClassifier(config, 2, ["prose", "verse"]).eval()
    with torch.no_grad():
        classifier.head.weight.normal_(std=1.0)
    checkpoint = save(run, classifier, tiny_tokenizer, model_class="classify", labels=classifier.labels)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(exported(checkpoint, "hf", run / "hf")).eval()
    assert type(hf).__name__ == "Qwen3ForSequenceClassification"
    ids = prompt(tiny_tokenizer, "KING: Now is the winter of our discontent")
    with torch.no_grad():
        assert (classifier(ids) - hf(ids).logits).abs().max() < 1e-4


@pytest.mark.parametrize("arch, kind", [("llama", "f32"), ("qwen3", "q8_0")])
def test_the_gguf_file_of_the_modern_shape_holds_llama_or_qwen3_tensors(run, tiny_tokenizer, arch, kind):
    torch.manual_seed(0)
    config = GPTConfig.from_preset("modern-tiny", vocab_size=len(tiny_tokenizer), max_seq_len=64, **MODERN[arch])
    model = GPTModel(config).eval()
    reader = gguf.GGUFReader(exported(save(run, model, tiny_tokenizer), "gguf", run / "m.gguf", "--type", kind))
    field = lambda name: reader.fields[name].contents()  # noqa: E731
    c = model.config
    assert field("general.architecture") == arch and field(f"{arch}.block_count") == c.n_layers
    assert (field(f"{arch}.attention.head_count"), field(f"{arch}.attention.head_count_kv")) == (4, 2)
    assert field(f"{arch}.rope.freq_base") == c.rope_theta and field(f"{arch}.rope.dimension_count") == 32
    assert field(f"{arch}.feed_forward_length") == c.d_ff
    tensors = {t.name: t for t in reader.tensors}
    assert ("output.weight" in tensors) == (not c.tie_embeddings)  # a tied head is read from token_embd
    assert ("blk.0.attn_q_norm.weight" in tensors) == (arch == "qwen3")
    assert [list(tensors[f"blk.0.attn_{p}.weight"].shape) for p in "qkv"] == [[128, 128], [128, 64], [128, 64]]
    assert list(tensors["blk.0.ffn_gate.weight"].shape) == [128, c.d_ff]
    k = tensors["blk.0.attn_k.weight"]
    values = torch.from_numpy(gguf.quants.dequantize(k.data, k.tensor_type).reshape(64, 128).copy())
    ours = model.transformer.h[0].attn.c_attn.weight.detach()[128:192]
    if arch == "llama":  # llama.cpp's llama rope rotates interleaved pairs: rows (j, j + 16) of a head -> (2j, 2j + 1)
        heads = ours.view(2, 2, 16, 128)
        ours = torch.stack([heads[:, 0], heads[:, 1]], dim=2).reshape(64, 128)
    assert (values - ours).abs().max() <= {"f32": 0, "q8_0": 2e-3}[kind]


@pytest.mark.skipif(not LLAMA_CPP, reason="llama-cpp-python is not installed (it builds llama.cpp from source, "
                                          "~6-10 minutes on 2 cores): pip install 'llama-cpp-python[server]'")
@pytest.mark.parametrize("arch", MODERN)
def test_llama_cpp_runs_the_modern_gguf_with_our_greedy_tokens(run, tiny_tokenizer, arch):
    from llama_cpp import Llama

    model = trained_on_the_embedded_corpus(tiny_tokenizer, steps=40, preset="modern-tiny", **MODERN[arch])
    path = exported(save(run, model, tiny_tokenizer), "gguf", run / "model.gguf")
    llm = Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False)
    ids = [tiny_tokenizer.bos_token_id, *tiny_tokenizer.encode_ordinary("ROMEO: But, soft!")]
    theirs = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
        theirs.append(token)
        if len(theirs) == 16:
            break
    ours = generate(model, torch.tensor([ids]), SamplingParams(max_new_tokens=16, do_sample=False))
    assert theirs == ours[0, len(ids):].tolist()


def test_an_extended_context_exports_as_linear_rope_scaling(run, tiny_tokenizer):
    """A rotary model stretched to a longer context (linear position interpolation) exports HF's linear
    rope_scaling and GGUF's scaling keys; transformers computes our logits beyond the original context."""
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("modern-tiny", vocab_size=len(tiny_tokenizer), max_seq_len=32)).eval()
    model.extend_context(64)
    folder = exported(save(run, model, tiny_tokenizer), "hf", run / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    assert hf.config.rope_parameters["rope_type"] == "linear" and hf.config.rope_parameters["factor"] == 2.0
    ids = torch.randint(0, len(tiny_tokenizer), (1, 60))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)["logits"]).abs().max() < 1e-4
    assert load_model(folder).config == model.config
    reader = gguf.GGUFReader(exported(run / "model.pth", "gguf", run / "m.gguf"))
    assert reader.fields["qwen3.rope.scaling.type"].contents() == "linear"
    assert reader.fields["qwen3.rope.scaling.factor"].contents() == 2.0
