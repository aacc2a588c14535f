"""The HTTP server (inference/api_service.py and the modules below it) against a live uvicorn on 127.0.0.1
serving a tiny model made here.

References: the engine's text for the same prompt and seed, computed directly (kv_cache_infer), the greedy
tokens of decoding.generate, the official `openai` client, and the server's own /metrics and /health.
"""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from tests.conftest import ROOT

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CONTEXT = 512
LONG = 500  # tokens of a generation long enough to observe while it runs (the fixture checks it does not end early)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The servers here run torch on one thread (num_threads=1, a process-wide setting): restore it afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tiny_tokenizer, tmp_path_factory) -> Path:
    """A random tiny model (context 512) whose greedy continuation of "A" runs LONG tokens without </s>."""
    from checkpoints import save_checkpoint
    from decoding import SamplingParams, generate
    from gpt_model import GPTConfig, GPTModel

    folder = tmp_path_factory.mktemp("served")
    tiny_tokenizer.save(folder / "tokenizer")
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), max_seq_len=CONTEXT, dropout=0.0))
    ids = torch.tensor([[tiny_tokenizer.bos_token_id] + tiny_tokenizer.encode_ordinary("A")])
    out = generate(model.eval(), ids, SamplingParams(max_new_tokens=LONG, do_sample=False,
                                                     eos_token_id=tiny_tokenizer.eos_token_id))
    assert tiny_tokenizer.eos_token_id not in out[0, ids.size(1):].tolist(), "precondition: a long greedy run"
    path = folder / "model.pth"
    save_checkpoint(path, model, tokenizer_fingerprint=tiny_tokenizer.fingerprint,
                    sft_template="### Q:{instruction}\n### A:{response}")
    return path


class LiveServer:
    """uvicorn serving create_app(settings) in a thread on a free port."""

    def __init__(self, settings):
        import uvicorn

        from inference.api_service import create_app

        self.app = create_app(settings)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the server did not become ready in 30 s")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(20)

    def metric(self, name: str, labels: str = "") -> float:
        """The value of one sample in /metrics (0 if absent)."""
        key = f"{name}{{{labels}}}" if labels else name
        for line in httpx.get(self.url + "/metrics", headers=self.headers()).text.splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        return 0.0

    def headers(self) -> dict:
        key = self.app.state.service.settings.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}


def settings_for(checkpoint: Path, **overrides):
    from inference.settings import Settings

    return Settings(model_path=str(checkpoint), num_threads=1, **overrides)


@pytest.fixture(scope="module")
def server(checkpoint):
    with LiveServer(settings_for(checkpoint, max_batch_size=8, max_new_tokens=LONG)) as live:
        yield live


@pytest.fixture(scope="module")
def reference(checkpoint):
    """(model, tokenizer) loaded directly, for texts computed without the server."""
    from checkpoints import load_model_and_tokenizer

    return load_model_and_tokenizer(checkpoint, device="cpu")


def direct_text(reference, prompt: str, max_gen_len: int, seed: int | None = None, greedy: bool = False, **kw) -> str:
    from decoding import SamplingParams
    from inference.kv_cache_infer import generate_with_kv_cache

    model, tokenizer = reference
    params = SamplingParams(max_new_tokens=max_gen_len, seed=seed, do_sample=not greedy,
                            temperature=kw.get("temperature", 0.8), top_k=kw.get("top_k", 50),
                            top_p=kw.get("top_p", 1.0), stop=kw.get("stop", ()))
    return generate_with_kv_cache(model, tokenizer, prompt, params)


def sse_events(response: httpx.Response) -> list:
    return [json.loads(line[len("data: "):]) if line != "data: [DONE]" else "[DONE]"
            for line in response.iter_lines() if line.startswith("data: ")]


# ----------------------------------------------------------------------------- endpoints


def test_health_reports_model_and_load(server, checkpoint):
    body = httpx.get(server.url + "/health").json()
    assert body["status"] == "ok" and body["model_path"] == str(checkpoint) and body["model"] == "model"
    from checkpoints import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(checkpoint)
    assert body["parameters"] == model.num_parameters()
    assert (body["device"], body["dtype"], body["quantization"]) == ("cpu", "float32", "none")
    assert (body["context_length"], body["active_sequences"], body["queue_depth"]) == (CONTEXT, 0, 0)
    assert body["uptime_s"] >= 0


def test_health_is_503_while_loading(checkpoint):
    from fastapi.testclient import TestClient

    from inference.api_service import create_app

    client = TestClient(create_app(settings_for(checkpoint)))  # no `with`: the startup (model load) never ran
    response = client.get("/health")
    assert response.status_code == 503 and response.json() == {"status": "loading"}
    assert client.post("/generate", json={"prefix": "A"}).status_code == 503


def test_generate_matches_the_engine_and_greedy_matches_decoding_generate(server, reference):
    from decoding import SamplingParams, generate

    body = {"prefix": "ROMEO:", "max_gen_len": 24, "top_k": 20, "temperature": 0.9, "seed": 3}
    response = httpx.post(server.url + "/generate", json=body, timeout=30).json()
    assert set(response) == {"prefix", "generated_text", "num_tokens", "finish_reason", "latency_ms"}
    assert response["generated_text"] == direct_text(reference, "ROMEO:", 24, seed=3, temperature=0.9, top_k=20)
    assert response["prefix"] == "ROMEO:" and response["latency_ms"] > 0

    model, tok = reference
    ids = torch.tensor([[tok.bos_token_id] + tok.encode_ordinary("ROMEO:")])
    params = SamplingParams(max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id)
    expected = generate(model, ids, params)[0, ids.size(1):]
    greedy = httpx.post(server.url + "/generate", json={"prefix": "ROMEO:", "max_gen_len": 24, "temperature": 0},
                        timeout=30).json()
    n = greedy["num_tokens"]
    assert greedy["generated_text"] == tok.decode(expected[:n].tolist())
    assert greedy["finish_reason"] == ("eos" if n < 24 else "length")


def test_stop_string_ends_the_text(server, reference):
    full = direct_text(reference, "A", 40, greedy=True)
    stop = full[10:13]
    response = httpx.post(server.url + "/generate", json={"prefix": "A", "max_gen_len": 40, "temperature": 0,
                                                          "stop": [stop]}, timeout=30).json()
    assert response["finish_reason"] == "stop"
    assert response["generated_text"] == full[:full.index(stop)]


def test_stream_pieces_join_to_the_non_streamed_text(server):
    body = {"prefix": "《静夜思》", "max_gen_len": 40, "seed": 11, "temperature": 1.2}
    whole = httpx.post(server.url + "/generate", json=body, timeout=30).json()
    with httpx.stream("POST", server.url + "/generate", json={**body, "stream": True}, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    pieces = [e["text"] for e in events[:-1]]
    assert all(p for p in pieces) and "".join(pieces) == whole["generated_text"]
    assert events[-1] == {"finish_reason": whole["finish_reason"], "num_tokens": whole["num_tokens"]}


def test_openai_client_completions_chat_and_streaming(server, reference):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["model"]

    completion = client.completions.create(model="model", prompt="ROMEO:", max_tokens=20, temperature=0)
    assert completion.choices[0].text == direct_text(reference, "ROMEO:", 20, greedy=True)
    usage = completion.usage
    _, tok = reference
    assert usage.prompt_tokens == 1 + len(tok.encode_ordinary("ROMEO:")) and usage.completion_tokens <= 20
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    stream = client.completions.create(model="model", prompt="ROMEO:", max_tokens=20, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == completion.choices[0].text
    assert chunks[-1].choices[0].finish_reason == completion.choices[0].finish_reason

    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"},
                {"role": "user", "content": "who are you?"}]
    chat = client.chat.completions.create(model="model", messages=messages, max_tokens=15, seed=5)
    # the conversation as prompts.render_prompt renders it (the terminal chat too), with the checkpoint's template
    from decoding import DecodeEngine, SamplingParams
    from prompts import render_prompt

    model, tok = reference
    ids = render_prompt(tok, messages, "### Q:{instruction}\n### A:{response}").ids
    engine = DecodeEngine(model, tok, n_slots=1)
    request = engine.run([ids], SamplingParams(max_new_tokens=15, temperature=1.0, top_k=0, seed=5,
                                               eos_token_id=tok.eos_token_id))[0]
    assert chat.choices[0].message.content == request.text and chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(ids)

    pieces = [c.choices[0].delta.content or "" for c in
              client.chat.completions.create(model="model", messages=messages, max_tokens=15, seed=5, stream=True)
              if c.choices]
    assert "".join(pieces) == request.text


def test_docs_list_every_field_with_bounds(server):
    schema = httpx.get(server.url + "/openapi.json").json()["components"]["schemas"]
    fields = schema["GenerateRequest"]["properties"]
    assert set(fields) == {"prefix", "max_gen_len", "top_k", "temperature", "top_p", "repetition_penalty", "seed",
                           "stop", "stream", "best_of"}
    assert fields["max_gen_len"]["maximum"] == LONG and fields["max_gen_len"]["minimum"] == 1
    assert fields["temperature"]["maximum"] == 5 and fields["top_p"]["exclusiveMinimum"] == 0
    assert all(f.get("description") for f in fields.values())
    assert httpx.get(server.url + "/docs").status_code == 200


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("body, field", [
    ({"prefix": ""}, "prefix"),
    ({"prefix": "A", "max_gen_len": 0}, "max_gen_len"),
    ({"prefix": "A", "max_gen_len": LONG + 1}, "max_gen_len"),
    ({"prefix": "A", "temperature": 5.5}, "temperature"),
    ({"prefix": "A", "temperature": -1}, "temperature"),
    ({"prefix": "A", "top_p": 0}, "top_p"),
    ({"prefix": "A", "top_k": -1}, "top_k"),
    ({"prefix": "A", "max_gen_len": "many"}, "max_gen_len"),
    ({"prefix": 7}, "prefix"),
    ({"prefix": "A", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prefix": "A", "stop": [""]}, "stop"),
    ({"prefix": "A", "bogus": 1}, "bogus"),
    ({"prefix": "A", "best_of": 0}, "best_of"),
    ({"prefix": "A", "best_of": 9}, "best_of"),
    ({}, "prefix"),
])
def test_invalid_fields_get_422_naming_the_field(server, body, field):
    response = httpx.post(server.url + "/generate", json=body)
    assert response.status_code == 422
    assert field in response.json()["error"]["message"]


def test_malformed_json_nan_and_unencodable_text_get_422(server):
    for raw in (b'{"prefix": "A",', b'[1, 2]', b'{"prefix": "A", "temperature": NaN}', b'{"prefix": "\\ud800"}'):
        response = httpx.post(server.url + "/generate", content=raw, headers={"content-type": "application/json"})
        assert response.status_code == 422, raw
        assert response.json()["error"]["message"]


TOOL_DESCRIBED = '{"type": "function", "function": {"name": "f", "description": "%s"}}'


@pytest.mark.parametrize("path, body, field", [  # \\ud800 here is JSON's escape of a lone surrogate
    ("/tokenize", '{"prompt": "A\\ud800", "add_special_tokens": false}', "prompt"),
    ("/tokenize", '{"prompt": "A\\ud800"}', "prompt"),
    ("/tokenize", '{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "B"}], '
                  '"add_generation_prompt": false}', "messages"),
    ("/tokenize", '{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages"),
    ("/generate", '{"prefix": "\\ud800"}', "prefix"),
    ("/generate", '{"prefix": "A", "stop": ["\\udbff"]}', "stop"),
    ("/v1/completions", '{"prompt": ["A\\ud800"]}', "prompt"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "messages"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "A"}], "tools": [%s]}'
     % (TOOL_DESCRIBED % "\\ud800"), "tools"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "A"}], "stream_options": {"\\ud800": 1}}',
     "stream_options"),
])
def test_text_that_is_not_unicode_is_one_422_naming_its_field_on_every_endpoint(server, path, body, field):
    response = httpx.post(server.url + path, content=body.encode(), headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert message.startswith(f"{field}: ") and "lone surrogate U+D" in message, message


class Captured(logging.Handler):
    """The formatted messages of the records a logger passes on (from any thread)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.mark.parametrize("query, logged", [
    ("api_key=sk-SECRET", "/tokenize?api_key=[redacted] "),
    ("key=SECRET&x=1", "/tokenize?key=[redacted]&x=[redacted] "),
    ("token=a%20SECRET&access_token=SECRET", "/tokenize?token=[redacted]&access_token=[redacted] "),
    ("sk-SECRET", "/tokenize?[redacted] "),
    ("x=1&SECRET&y=", "/tokenize?x=[redacted]&[redacted]&y=[redacted] "),  # a bare item may be the key itself
])
def test_the_access_log_never_holds_a_query_value(server, query, logged):
    access, capture = logging.getLogger("uvicorn.access"), Captured()
    level = access.level
    access.addHandler(capture)
    access.setLevel(logging.INFO)
    try:
        assert httpx.post(f"{server.url}/tokenize?{query}", json={"prompt": "A"}).status_code == 200
        _wait_for(lambda: any("/tokenize?" in line for line in capture.lines))
    finally:
        access.removeHandler(capture)
        access.setLevel(level)
    line = next(line for line in capture.lines if "/tokenize?" in line)
    assert logged in line and "SECRET" not in line, line


def test_limits_beyond_the_context_and_vocabulary_get_422(server, reference):
    _, tok = reference
    response = httpx.post(server.url + "/generate", json={"prefix": "A" * 600, "max_gen_len": 5})
    assert response.status_code == 422 and "at most" in response.json()["error"]["message"]
    n_prompt = 1 + len(tok.encode_ordinary("ROMEO: " * 20))
    response = httpx.post(server.url + "/generate", json={"prefix": "ROMEO: " * 20, "max_gen_len": LONG})
    message = response.json()["error"]["message"]
    assert response.status_code == 422 and f"{n_prompt} tokens" in message and f"context of {CONTEXT}" in message
    response = httpx.post(server.url + "/generate", json={"prefix": "A", "top_k": len(tok) + 1})
    assert response.status_code == 422 and "vocabulary" in response.json()["error"]["message"]
    response = httpx.post(server.url + "/v1/completions", json={"prompt": "A", "n": 99})
    assert response.status_code == 422
    response = httpx.post(server.url + "/v1/chat/completions",
                          json={"messages": [{"role": "assistant", "content": "hi"}]})
    assert response.status_code == 422 and "user" in response.json()["error"]["message"]


def test_a_body_over_the_limit_gets_413(checkpoint):
    with LiveServer(settings_for(checkpoint, max_body_bytes=2000)) as live:
        response = httpx.post(live.url + "/generate", json={"prefix": "A" * 5000})
        assert response.status_code == 413
        assert httpx.post(live.url + "/generate", json={"prefix": "A", "max_gen_len": 2}).status_code == 200


def test_speculative_decoding_gives_a_lone_request_the_plain_greedy_text(checkpoint, reference):
    prompt = "ROMEO: ROMEO: ROMEO:"  # repeated: the lookup drafts have something to propose
    with LiveServer(settings_for(checkpoint, speculative=3)) as live:
        assert live.app.state.service.served.worker.engine.speculative.k == 3
        response = httpx.post(live.url + "/generate", json={"prefix": prompt, "max_gen_len": 24, "temperature": 0},
                              timeout=30).json()
        assert live.app.state.service.served.worker.engine.speculation.steps > 0
    assert response["generated_text"] == direct_text(reference, prompt, 24, greedy=True)


def test_api_key_guards_every_route_but_health(checkpoint):
    with LiveServer(settings_for(checkpoint, api_key="s3cret")) as live:
        assert httpx.get(live.url + "/health").status_code == 200
        for method, path in [("POST", "/generate"), ("GET", "/metrics"), ("GET", "/v1/models"), ("GET", "/docs"),
                             ("POST", "/v1/completions")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
                response = httpx.request(method, live.url + path, json={"prefix": "A"}, headers=headers)
                assert response.status_code == 401, (path, headers)
                assert response.headers["www-authenticate"] == "Bearer"
        ok = httpx.post(live.url + "/generate", json={"prefix": "A", "max_gen_len": 2},
                        headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert "s3cret" not in repr(live.app.state.service.settings)


# ----------------------------------------------------------------------------- best of N


@pytest.fixture(scope="module")
def reward_checkpoint(checkpoint, tiny_tokenizer) -> Path:
    """A random tiny reward model next to the served one, trained (nominally) with the same tokenizer."""
    from checkpoints import save_checkpoint
    from gpt_model import GPTConfig
    from model_heads import GPTRewardModel

    torch.manual_seed(1)
    reward = GPTRewardModel(GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), max_seq_len=CONTEXT,
                                                  dropout=0.0))
    path = checkpoint.parent / "reward.pth"
    save_checkpoint(path, reward, tokenizer_fingerprint=tiny_tokenizer.fingerprint, model_class="reward")
    return path


def direct_candidates(reference, prompt: str, n: int, seed: int, max_new: int, temperature: float, top_k: int):
    """The n samples best_of draws, made here: seeds seed, seed + 1, ... on a DecodeEngine of the reference model."""
    from decoding import DecodeEngine, SamplingParams

    model, tok = reference
    ids = [tok.bos_token_id] + tok.encode_ordinary(prompt)
    params = [SamplingParams(max_new_tokens=max_new, temperature=temperature, top_k=top_k, seed=seed + i,
                             eos_token_id=tok.eos_token_id) for i in range(n)]
    return ids, DecodeEngine(model, tok, n_slots=n).run([ids] * n, params)


def mean_logprob(model, prompt_ids: list[int], response_ids: list[int]) -> float:
    """Mean log-prob of the sampled response tokens (a closing </s> included) under the model, computed directly."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + response_ids]))["logits"][0, len(prompt_ids) - 1:-1]
    return torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(response_ids)[:, None]).mean().item()


def reward_of(reward, tok, prompt_ids: list[int], text: str) -> float:
    with torch.no_grad():
        return reward(torch.tensor([prompt_ids + tok.encode_ordinary(text) + [tok.eos_token_id]])).item()


def pick_seed(score_candidates, n: int) -> tuple[int, list, int]:
    """A seed whose best candidate is not the first (so returning candidate 0 would fail), its candidates and best."""
    for seed in range(50):
        requests, scores = score_candidates(seed)
        best = max(range(n), key=scores.__getitem__)
        if best != 0 and len({r.text for r in requests}) == n:
            return seed, requests, best
    raise AssertionError("no seed gives distinct candidates with a best one after the first")


def n_tokens(request) -> int:
    return len(request.output_ids) - (request.finish_reason == "eos")


def test_best_of_returns_the_sample_with_the_highest_mean_logprob(server, reference):
    model, tok = reference
    sample = dict(max_new=12, temperature=1.5, top_k=0)

    def scored(seed):
        ids, requests = direct_candidates(reference, "ROMEO:", 4, seed, **sample)
        return requests, [mean_logprob(model, ids, r.output_ids) for r in requests]

    seed, requests, best = pick_seed(scored, 4)
    body = {"prefix": "ROMEO:", "max_gen_len": 12, "temperature": 1.5, "top_k": 0, "seed": seed, "best_of": 4}
    generated_before = server.metric("gpt_generated_tokens_total")
    response = httpx.post(server.url + "/generate", json=body, timeout=60).json()
    assert response["generated_text"] == requests[best].text
    assert (response["num_tokens"], response["finish_reason"]) == (n_tokens(requests[best]),
                                                                    requests[best].finish_reason)
    # every sample is counted in the generated tokens, not just the returned one
    assert server.metric("gpt_generated_tokens_total") - generated_before == sum(len(r.output_ids) for r in requests)
    assert httpx.post(server.url + "/generate", json=body, timeout=60).json() | {"latency_ms": 0} == \
        response | {"latency_ms": 0}  # a fixed seed reproduces
    plain = httpx.post(server.url + "/generate", json={**body, "best_of": 1, "seed": seed + best}, timeout=60).json()
    assert plain["generated_text"] == response["generated_text"]  # candidate i is the plain request with seed + i


def test_best_of_with_a_reward_model_returns_its_favourite(checkpoint, reward_checkpoint, reference):
    from checkpoints import load_model_and_tokenizer

    _, tok = reference
    reward, _ = load_model_and_tokenizer(reward_checkpoint, checkpoint.parent / "tokenizer")

    def scored(seed):  # /v1/completions samples at temperature 1 over the whole vocabulary by default
        ids, requests = direct_candidates(reference, "JULIET:", 5, seed, max_new=10, temperature=1.0, top_k=0)
        return requests, [reward_of(reward, tok, ids, r.text) for r in requests]

    seed, requests, best = pick_seed(scored, 5)
    with LiveServer(settings_for(checkpoint, reward_model=str(reward_checkpoint), max_best_of=5)) as live:
        health = httpx.get(live.url + "/health").json()
        assert (health["reward_model"], health["max_best_of"]) == (str(reward_checkpoint), 5)
        body = {"prompt": "JULIET:", "max_tokens": 10, "seed": seed, "best_of": 5}
        completion = httpx.post(live.url + "/v1/completions", json=body, timeout=60).json()
        assert completion["choices"][0]["text"] == requests[best].text
        assert completion["usage"]["completion_tokens"] == n_tokens(requests[best])
        again = httpx.post(live.url + "/v1/completions", json=body, timeout=60).json()
        assert again["choices"] == completion["choices"]
        over = httpx.post(live.url + "/v1/completions", json={**body, "best_of": 6})
        assert over.status_code == 422 and "best_of" in over.json()["error"]["message"]


def test_best_of_is_refused_with_stream_and_greedy_samples_once(server, reference):
    for path, body in (("/generate", {"prefix": "A", "best_of": 2, "stream": True}),
                       ("/v1/completions", {"prompt": "A", "best_of": 2, "stream": True})):
        response = httpx.post(server.url + path, json=body)
        assert response.status_code == 422 and "stream" in response.json()["error"]["message"]
    assert httpx.get(server.url + "/health").json()["reward_model"] is None
    greedy = {"prefix": "ROMEO:", "max_gen_len": 8, "temperature": 0}
    generated_before = server.metric("gpt_generated_tokens_total")
    response = httpx.post(server.url + "/generate", json={**greedy, "best_of": 8}, timeout=30).json()
    assert response["generated_text"] == direct_text(reference, "ROMEO:", 8, greedy=True)
    n_sampled = response["num_tokens"] + (response["finish_reason"] == "eos")
    assert server.metric("gpt_generated_tokens_total") - generated_before == n_sampled  # one sequence, not 8


def test_a_reward_model_of_another_tokenizer_or_kind_is_a_one_line_startup_error(checkpoint, tiny_tokenizer,
                                                                                   capsys):
    from checkpoints import save_checkpoint
    from cli import UsageError, run_cli
    from gpt_model import GPTConfig
    from inference.api_service import main
    from inference.server_metrics import Metrics
    from inference.serving import load_served_model
    from model_heads import GPTRewardModel

    foreign = checkpoint.parent / "foreign_reward.pth"
    config = GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), max_seq_len=CONTEXT, dropout=0.0)
    save_checkpoint(foreign, GPTRewardModel(config), tokenizer_fingerprint="0" * 64, model_class="reward")
    assert run_cli(main, ["--model_path", str(checkpoint), "--reward_model", str(foreign)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "fingerprint" in err and len(err.splitlines()) == 1
    for reward, message in ((foreign, "another tokenizer"), (checkpoint, "is a language model .*not a reward model"),
                            (checkpoint.parent / "none.pth", "is not a file")):
        with pytest.raises(ValueError, match=message) as raised:  # what the server reports at load (uvicorn ...:app)
            load_served_model(settings_for(checkpoint, reward_model=str(reward)), Metrics())
        assert len(str(raised.value).splitlines()) == 1


# ----------------------------------------------------------------------------- batching and load


async def _post_all(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as client:
        return await asyncio.gather(*(client.post(url + "/generate", json=b) for b in bodies))


def test_concurrent_requests_are_batched_and_match_sequential_results(server):
    bodies = [{"prefix": p, "max_gen_len": 30 + 3 * i, "seed": i, "temperature": 0.7 + 0.1 * (i % 3), "top_k": 40}
              for i, p in enumerate(["ROMEO:", "JULIET:", "LEAR:", "春眠不觉晓", "A", "To be", "HAMLET:", "夜"])]
    bodies[3] = {**bodies[3], "temperature": 0}  # a greedy row in the same batch
    sequential = [httpx.post(server.url + "/generate", json=b, timeout=30).json() for b in bodies]
    steps_before = server.metric("gpt_batch_size_count")
    batched_sum_before = server.metric("gpt_batch_size_sum")
    concurrent = [r.json() for r in asyncio.run(_post_all(server.url, bodies))]
    assert [r["generated_text"] for r in concurrent] == [r["generated_text"] for r in sequential]
    steps = server.metric("gpt_batch_size_count") - steps_before
    mean_batch = (server.metric("gpt_batch_size_sum") - batched_sum_before) / steps
    assert mean_batch > 2, f"mean sequences per decode step {mean_batch:.2f}"


def test_queue_bound_counts_free_slots_then_max_queue(reference):
    from decoding import DecodeEngine, SamplingParams
    from inference.engine_worker import EngineWorker, Job, QueueFull
    from inference.server_metrics import Metrics

    model, tok = reference
    worker = EngineWorker(DecodeEngine(model, tok, n_slots=2), Metrics(), max_queue=3, device=torch.device("cpu"),
                          dtype=torch.float32)  # not started: nothing leaves the queue
    loop = asyncio.new_event_loop()
    try:
        jobs = [Job([tok.bos_token_id], SamplingParams(max_new_tokens=1), loop) for _ in range(6)]
        for job in jobs[:5]:  # 2 free slots + 3 waiting places
            worker.submit(job)
        with pytest.raises(QueueFull):
            worker.submit(jobs[5])
        worker.cancel(jobs[0])  # a waiting job leaves the queue at once
        assert worker.queue_depth == 4
        worker.submit(jobs[5])
    finally:
        loop.close()


def test_full_queue_gets_429_with_retry_after(checkpoint):
    with LiveServer(settings_for(checkpoint, max_batch_size=1, max_queue=1, max_new_tokens=LONG)) as live:
        body = {"prefix": "A", "max_gen_len": 200, "temperature": 0}
        responses = asyncio.run(_post_all(live.url, [body] * 12))  # 1 runs, 1 waits, the rest find the queue full
        codes = [r.status_code for r in responses]
        rejected = [r for r in responses if r.status_code == 429]
        assert set(codes) == {200, 429} and codes.count(200) >= 2, codes
        assert all(r.headers["retry-after"] == "1" for r in rejected)
        assert "max_queue" in rejected[0].json()["error"]["message"]
        assert live.metric("gpt_requests_total", 'endpoint="/generate",status="429"') == len(rejected)


def test_timeout_gets_504_and_frees_the_slot(checkpoint):
    with LiveServer(settings_for(checkpoint, max_batch_size=1, request_timeout=0.3, max_new_tokens=LONG)) as live:
        started = time.perf_counter()
        response = httpx.post(live.url + "/generate", json={"prefix": "A", "max_gen_len": LONG, "temperature": 0},
                              timeout=30)
        assert response.status_code == 504 and "request_timeout" in response.json()["error"]["message"]
        assert time.perf_counter() - started < 5
        _wait_for(lambda: httpx.get(live.url + "/health").json()["active_sequences"] == 0)
        assert live.metric("gpt_sequences_finished_total", 'reason="timeout"') == 1
        assert httpx.post(live.url + "/generate", json={"prefix": "A", "max_gen_len": 3}).status_code == 200


def _wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "condition not reached in time"
        time.sleep(0.02)


def test_a_cancelled_stream_frees_its_slot(server):
    aborted_before = server.metric("gpt_sequences_finished_total", 'reason="aborted"')
    with httpx.stream("POST", server.url + "/generate", json={"prefix": "A", "max_gen_len": LONG, "temperature": 0,
                                                             "stream": True}, timeout=60) as response:
        lines = response.iter_lines()
        next(lines)
        assert httpx.get(server.url + "/health").json()["active_sequences"] == 1
    _wait_for(lambda: httpx.get(server.url + "/health").json()["active_sequences"] == 0)
    assert server.metric("gpt_sequences_finished_total", 'reason="aborted"') == aborted_before + 1


def test_a_disconnected_plain_request_is_cancelled(server):
    aborted_before = server.metric("gpt_sequences_finished_total", 'reason="aborted"')
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/generate", json={"prefix": "A", "max_gen_len": LONG, "temperature": 0}, timeout=0.3)
    _wait_for(lambda: httpx.get(server.url + "/health").json()["active_sequences"] == 0)
    assert server.metric("gpt_sequences_finished_total", 'reason="aborted"') == aborted_before + 1


CHURN = [  # (route, body): short requests of every kind, each client leaving after 1-80 ms or staying
    ("/generate", {"prefix": "A", "max_gen_len": 4}),
    ("/generate", {"prefix": "A", "max_gen_len": 4, "stream": True}),
    ("/v1/completions", {"prompt": "A", "max_tokens": 4, "n": 2}),
    ("/v1/completions", {"prompt": "A", "max_tokens": 4, "logprobs": 2, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "A"}], "max_tokens": 4}),
    ("/v1/completions", {"prompt": "A", "max_tokens": 4, "best_of": 2}),
]


async def churn(url: str, requests: int, seed: int) -> list[int]:
    """The status of every request whose client stayed; the others leave after 1-80 ms (16 at a time)."""
    rng, statuses, room = random.Random(seed), [], asyncio.Semaphore(16)
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=32)) as client:
        async def one(path: str, body: dict, stay: float | None) -> None:
            async def whole() -> None:
                async with client.stream("POST", url + path, json=body) as response:
                    await response.aread()
                    statuses.append(response.status_code)
            async with room:
                try:
                    await asyncio.wait_for(whole(), stay)
                except asyncio.TimeoutError:
                    pass  # the client left
        await asyncio.gather(*(one(*rng.choice(CHURN), None if rng.random() < 0.3 else rng.uniform(0.001, 0.08))
                               for _ in range(requests)))
    return statuses


@pytest.mark.slow
def test_clients_leaving_at_any_moment_free_their_slots_and_log_nothing(checkpoint):
    """Two slots, requests of every kind whose clients mostly leave within 80 ms: every request that stays is
    answered (no "0 free slots" 422), the slots come back, and a leaving client logs no traceback."""
    capture = Captured()
    capture.setLevel(logging.WARNING)
    watched = [logging.getLogger(name) for name in ("", "uvicorn", "asyncio")]  # uvicorn's does not propagate
    for logger in watched:
        logger.addHandler(capture)
    try:
        with LiveServer(settings_for(checkpoint, max_batch_size=2, max_queue=256, max_best_of=2)) as live:
            statuses = asyncio.run(churn(live.url, 160, seed=0))
            _wait_for(lambda: httpx.get(live.url + "/health").json()["active_sequences"] == 0)
            health = httpx.get(live.url + "/health").json()
            engine = live.app.state.service.served.worker.engine
            gc.collect()  # a future whose error nobody read is logged when it is collected
    finally:
        for logger in watched:
            logger.removeHandler(capture)
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    assert health["queue_depth"] == 0 and engine.free_slots == [0, 1]
    assert capture.lines == [], capture.lines[:3]


def test_health_and_metrics_answer_promptly_during_a_long_generation(server):
    async def scenario():
        async with httpx.AsyncClient(timeout=60) as client:
            long = asyncio.ensure_future(client.post(server.url + "/generate",
                                                     json={"prefix": "A", "max_gen_len": LONG, "temperature": 0}))
            deadline = time.time() + 10
            while (await client.get(server.url + "/health")).json()["active_sequences"] == 0:
                assert time.time() < deadline
                await asyncio.sleep(0.01)
            times = []
            for path in ("/health", "/metrics") * 3:
                start = time.perf_counter()
                assert (await client.get(server.url + path)).status_code == 200
                times.append(time.perf_counter() - start)
            busy = (await client.get(server.url + "/health")).json()["active_sequences"]
            result = await long
            return times, busy, result.json()

    times, busy, result = asyncio.run(scenario())
    assert busy == 1 and result["num_tokens"] == LONG
    assert max(times) < 1.0, times


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_and_exits_0(checkpoint, tmp_path):
    port = free_port()
    env = {**os.environ, "GPT_MODEL_PATH": str(checkpoint), "GPT_PORT": str(port), "GPT_NUM_THREADS": "1",
           "GPT_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "inference.api_service"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for(lambda: _ready(url), timeout=60)
        with httpx.stream("POST", url + "/generate", json={"prefix": "A", "max_gen_len": 60, "temperature": 0,
                                                          "stream": True}, timeout=60) as response:
            lines = response.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            events = [json.loads(l[6:]) for l in lines if l.startswith("data: ")]
        assert events[-1] == {"finish_reason": "length", "num_tokens": 60}
        assert proc.wait(timeout=30) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=1)
    finally:
        proc.kill() if proc.poll() is None else None


LONG_STREAMS = [  # (route, body): streams that run far past --shutdown_timeout unless it ends them
    ("/generate", {"prefix": "A", "max_gen_len": 2000, "temperature": 0, "stream": True}),
    ("/v1/completions", {"prompt": "A", "max_tokens": 2000, "temperature": 0, "stream": True}),
    ("/v1/completions", {"prompt": "B", "max_tokens": 2000, "n": 2, "logprobs": 1, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "A"}], "max_tokens": 2000, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "B"}], "max_tokens": 2000, "n": 2,
                              "stream": True, "stream_options": {"include_usage": True}}),
    ("/generate", {"prefix": "B", "max_gen_len": 2000, "stream": True}),
]


async def stream_events(url: str, streams: list[tuple[str, dict]], on_started) -> list[list]:
    """Each stream's events (JSON, or "[DONE]"); `on_started()` once every stream has its first event."""
    started = [asyncio.Event() for _ in streams]

    async def read(client: httpx.AsyncClient, path: str, body: dict, first: asyncio.Event) -> list:
        events = []
        async with client.stream("POST", url + path, json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append("[DONE]" if line == "data: [DONE]" else json.loads(line[len("data: "):]))
                    first.set()
        return events

    async with httpx.AsyncClient(timeout=60) as client:
        readers = [asyncio.ensure_future(read(client, p, b, e)) for (p, b), e in zip(streams, started)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 60)
        on_started()
        return await asyncio.gather(*readers)


def final_event(path: str, events: list) -> dict:
    """A stream's final event: /generate's last; an OpenAI stream's last before [DONE] (usage chunk aside)."""
    if path == "/generate":
        return events[-1]
    assert events[-1] == "[DONE]", events[-3:]
    last = [e for e in events[:-1] if not (e.get("usage") and not e.get("choices"))][-1]
    return last if "error" in last else {"finish_reason": last["choices"][0]["finish_reason"]}


@pytest.mark.slow
def test_sigterm_ends_every_stream_with_its_final_event_within_the_shutdown_timeout(tiny_tokenizer, tmp_path):
    """Six long streams of every route in flight at SIGTERM with --shutdown_timeout 1: each ends with its final
    event (an error event saying the server is shutting down, then [DONE] on the OpenAI routes), none is cut, and
    the server exits 0 within the timeout and its flush second."""
    from checkpoints import save_checkpoint
    from gpt_model import GPTConfig, GPTModel

    tiny_tokenizer.save(tmp_path / "tokenizer")
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), max_seq_len=2048, dropout=0.0))
    save_checkpoint(tmp_path / "long.pth", model, tokenizer_fingerprint=tiny_tokenizer.fingerprint,
                    sft_template="### Q:{instruction}\n### A:{response}")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "inference.api_service", "--model_path", str(tmp_path / "long.pth"),
                             "--port", str(port), "--num_threads", "1", "--shutdown_timeout", "1",
                             "--max_new_tokens", "2000", "--max_best_of", "2"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for(lambda: _ready(url), timeout=60)
        sent: list[float] = []
        streams = asyncio.run(stream_events(url, LONG_STREAMS, lambda: (proc.send_signal(signal.SIGTERM),
                                                                        sent.append(time.time()))))
        assert proc.wait(timeout=30) == 0 and time.time() - sent[0] < 10
        log = proc.stdout.read()
    finally:
        proc.kill() if proc.poll() is None else None
    finals = [final_event(path, events) for (path, _), events in zip(LONG_STREAMS, streams)]
    assert all("finish_reason" in f or "error" in f for f in finals), finals
    cut = [f for f in finals if "error" in f]
    assert cut and all(f["error"]["code"] == 503 and "shutting down" in f["error"]["message"] for f in cut), finals
    assert "Traceback" not in log, log[-2000:]


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


# ----------------------------------------------------------------------------- settings and CLI


@pytest.mark.parametrize("argv, message", [
    (["--max_batch_size", "0"], "--max_batch_size: must be >= 1"),
    (["--request_timeout", "-1"], "--request_timeout: must be > 0"),
    (["--quantize", "int4"], "--quantize must be none or int8"),
    (["--calculator", "maybe"], "--calculator must be on or off"),
    (["--prefix_cache", "maybe"], "--prefix_cache must be on or off"),
    (["--compile", "fast"], "--compile must be auto, on, static or off"),
    (["--speculative", "-1"], "--speculative"),
    (["--speculative", "two"], "--speculative"),
    (["--model_path", "/no/such/model.pth"], "is not a file"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    from cli import run_cli
    from inference.api_service import main

    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1


def test_int8_quantization_at_startup(checkpoint):
    with LiveServer(settings_for(checkpoint, quantize="int8")) as live:
        assert httpx.get(live.url + "/health").json()["quantization"] == "int8"
        response = httpx.post(live.url + "/generate", json={"prefix": "ROMEO:", "max_gen_len": 10, "seed": 0})
        assert response.status_code == 200 and response.json()["num_tokens"] >= 1


# ----------------------------------------------------------------------------- chat: overflow, n, logprobs, tokens

TEMPLATE = "### Q:{instruction}\n### A:{response}"  # the checkpoint fixture's


def talk(turns: int) -> list[dict]:
    out = [{"role": "system", "content": "Be brief."}]
    for i in range(turns):
        out += [{"role": "user", "content": f"question {i} " * 6}, {"role": "assistant", "content": f"answer {i} " * 6}]
    return out + [{"role": "user", "content": "and now?"}]


def test_a_long_chat_loses_its_oldest_turns_and_says_how_many(server, reference):
    from prompts import render_prompt

    _, tok = reference
    messages = talk(20)
    whole = render_prompt(tok, messages, TEMPLATE).ids
    assert len(whole) > CONTEXT  # it cannot fit as it is
    response = httpx.post(server.url + "/v1/chat/completions",
                          json={"messages": messages, "max_tokens": 8, "temperature": 0})
    assert response.status_code == 200, response.text
    expected = render_prompt(tok, messages, TEMPLATE, limit=CONTEXT - 8)
    body = response.json()
    assert expected.dropped_turns > 0 and body["usage"]["dropped_turns"] == expected.dropped_turns
    assert body["usage"]["prompt_tokens"] == len(expected.ids)
    assert response.headers["x-dropped-turns"] == str(expected.dropped_turns)
    too_long = [{"role": "user", "content": "word " * 2000}]
    response = httpx.post(server.url + "/v1/chat/completions", json={"messages": too_long, "max_tokens": 8})
    assert response.status_code == 422 and "last turn" in response.json()["error"]["message"]


def test_n_choices_are_the_seeded_samples_and_stream_by_index(server):
    from inference.serving import candidate_seeds

    body = {"prompt": "ROMEO:", "max_tokens": 12, "temperature": 1.0, "seed": 11}
    many = httpx.post(server.url + "/v1/completions", json={**body, "n": 3}).json()
    assert [c["index"] for c in many["choices"]] == [0, 1, 2]
    tokens = 0
    for choice, seed in zip(many["choices"], candidate_seeds(11, 3)):
        alone = httpx.post(server.url + "/v1/completions", json={**body, "seed": seed}).json()
        assert choice["text"] == alone["choices"][0]["text"]
        tokens += alone["usage"]["completion_tokens"]
    assert many["usage"]["completion_tokens"] == tokens
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "n": 3, "stream": True}) as response:
        events = sse_events(response)
    texts = {i: "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"][0]["index"] == i)
             for i in range(3)}
    assert texts == {i: c["text"] for i, c in enumerate(many["choices"])} and events[-1] == "[DONE]"
    finishes = [e["choices"][0]["index"] for e in events[:-1] if e["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [0, 1, 2]
    response = httpx.post(server.url + "/v1/completions", json={**body, "n": 2, "best_of": 3})
    assert response.status_code == 422 and "best_of" in response.json()["error"]["message"]


def test_logprobs_are_the_engines_own(server, reference):
    from decoding import DecodeEngine, SamplingParams

    model, tok = reference
    body = {"prompt": "ROMEO:", "max_tokens": 6, "temperature": 0, "logprobs": 2}
    reply = httpx.post(server.url + "/v1/completions", json=body).json()["choices"][0]
    ids = [tok.bos_token_id, *tok.encode_ordinary("ROMEO:")]
    engine = DecodeEngine(model, tok, n_slots=1)
    request = engine.add(ids, SamplingParams(max_new_tokens=6, do_sample=False, logprobs=2,
                                             eos_token_id=tok.eos_token_id))
    outputs = []
    while engine.has_work:
        outputs += engine.step()
    mine = [o for o in outputs if o.token_id != tok.eos_token_id]
    logprobs = reply["logprobs"]
    assert logprobs["token_logprobs"] == pytest.approx([o.logprob for o in mine], abs=1e-4)
    assert "".join(logprobs["tokens"]) == reply["text"] == request.text
    assert [len(top) for top in logprobs["top_logprobs"]] == [2] * len(mine)
    assert logprobs["text_offset"][0] == 0
    chat = httpx.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "logprobs": True, "top_logprobs": 1,
        "temperature": 0}).json()["choices"][0]
    content = chat["logprobs"]["content"]
    assert "".join(c["token"] for c in content) == chat["message"]["content"]
    assert all(len(c["top_logprobs"]) == 1 and c["logprob"] <= 0 for c in content)
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}) as response:
        streamed = [e for e in sse_events(response)[:-1] if e["choices"][0]["logprobs"]]
    flat = [lp for e in streamed for lp in e["choices"][0]["logprobs"]["token_logprobs"]]
    assert flat == pytest.approx(logprobs["token_logprobs"], abs=1e-4)


TOOL = {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
    "a": {"type": "integer"}}}}}
CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]}


def deep_schema(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize("extra, name", [
    ({"tools": []}, "tools"),
    ({"response_format": {"type": "json"}}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_object", "json_schema": {"name": "a", "schema": {}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}}, "name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": []}}}, "schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": deep_schema(40)}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "enum": ["x" * 60] * 2000}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "banana"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}}}}, "response_format"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": deep_schema(40)}}]}, "parameters"),
    ({"tools": [TOOL, TOOL]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "banana"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": [TOOL] * 129}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": "always"}, "tool_choice"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "sub"}}}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi"}, {**CALL, "tool_calls": [{**CALL["tool_calls"][0], "function": {
        "name": "add", "arguments": "{not json"}}]}, {"role": "user", "content": "?"}]}, "arguments"),
    ({"messages": [{"role": "user", "content": "hi"}, {**CALL, "tool_calls": [{**CALL["tool_calls"][0], "function": {
        "name": "add", "arguments": "[1]"}}]}, {"role": "user", "content": "?"}]}, "arguments"),
    ({"messages": [{"role": "user", "content": "hi"}, CALL, {"role": "tool", "content": "2"}]}, "tool_call_id"),
    ({"messages": [{"role": "user", "content": "hi"}, CALL, {"role": "tool", "tool_call_id": "call_9",
                                                            "content": "2"}]}, "tool_call_id"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": CALL["tool_calls"]}]}, "tool_calls"),
    ({"messages": [{"role": "user", "content": None}]}, "content"),
    ({"parallel_tool_calls": "maybe"}, "parallel_tool_calls"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"top_logprobs": 2}, "top_logprobs"),
])
def test_a_parameter_the_server_cannot_serve_is_a_422_naming_it(server, extra, name):
    response = httpx.post(server.url + "/v1/chat/completions",
                          json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra})
    assert response.status_code == 422 and name in response.json()["error"]["message"], response.text
    ok = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                               "max_tokens": 2, "user": "u1", "presence_penalty": 0})
    assert ok.status_code == 200


def test_tokenize_and_detokenize_use_the_servers_renderer(server, reference):
    from prompts import render_prompt

    _, tok = reference
    messages = [{"role": "user", "content": "计算 1 + 2 = ?"}]
    got = httpx.post(server.url + "/tokenize", json={"messages": messages}).json()
    assert got["tokens"] == render_prompt(tok, messages, TEMPLATE).ids and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == CONTEXT
    plain = httpx.post(server.url + "/tokenize", json={"prompt": "ROMEO: 你好"}).json()["tokens"]
    assert plain == [tok.bos_token_id, *tok.encode_ordinary("ROMEO: 你好")]
    text = httpx.post(server.url + "/detokenize", json={"tokens": plain}).json()["prompt"]
    assert text == "<s>ROMEO: 你好"
    assert httpx.post(server.url + "/tokenize", json={"prompt": "a", "messages": messages}).status_code == 422
    assert httpx.post(server.url + "/detokenize", json={"tokens": [10 ** 6]}).status_code == 422


def test_degenerate_sampling_values_are_served_and_the_engine_keeps_serving(server):
    for extreme in ({"temperature": 1e-45}, {"top_p": 1e-300}, {"temperature": 1e-45, "top_k": 3}):
        response = httpx.post(server.url + "/generate", json={"prefix": "ROMEO:", "max_gen_len": 4, **extreme})
        assert response.status_code == 200, response.text
    bad = httpx.post(server.url + "/generate", json={"prefix": "ROMEO:", "repetition_penalty": 1e-45})
    assert bad.status_code == 422 and "repetition_penalty" in bad.text
    assert httpx.get(server.url + "/health").json()["active_sequences"] == 0
    assert httpx.post(server.url + "/generate", json={"prefix": "A", "max_gen_len": 3}).status_code == 200


POISON = "POISON"


def poisoned_sampler(engine, tokenizer, at: str):
    """The engine's sampler, raising ValueError (not a RuntimeError) for a batch holding the poisoned prompt: at its
    prefill, or from its second token on."""
    real, poison = engine._sample, tokenizer.encode_ordinary(POISON)

    def sample(requests, logits):
        for r in requests:
            if r.prompt_ids[1:] == poison and (at == "prefill" or r.output_ids):
                raise ValueError(f"injected at {at}")
        return real(requests, logits)
    return sample


@pytest.mark.parametrize("at", ["prefill", "step"])
def test_a_failing_sample_fails_its_request_alone_and_the_engine_serves_on(checkpoint, reference, at):
    with LiveServer(settings_for(checkpoint)) as live:
        engine = live.app.state.service.served.worker.engine
        engine._sample = poisoned_sampler(engine, reference[1], at)
        failed = httpx.post(live.url + "/generate", json={"prefix": POISON, "max_gen_len": 4})
        assert failed.status_code in (500, 503) and "injected" in failed.text, failed.text
        assert all(slot is None for slot in engine.slots)  # nothing left behind in the engine
        for _ in range(2):
            assert httpx.post(live.url + "/generate", json={"prefix": "A", "max_gen_len": 3}).status_code == 200
        assert httpx.get(live.url + "/health").status_code == 200


def test_a_dead_engine_thread_makes_health_503(checkpoint):
    with LiveServer(settings_for(checkpoint)) as live:
        worker = live.app.state.service.served.worker
        worker._iterate = lambda: (_ for _ in ()).throw(KeyError("a bug"))
        httpx.post(live.url + "/generate", json={"prefix": "A", "max_gen_len": 2})  # wakes the loop
        deadline = time.time() + 10
        while worker.alive and time.time() < deadline:
            time.sleep(0.02)
        health = httpx.get(live.url + "/health")
        assert health.status_code == 503 and "decode engine stopped" in health.json()["error"]
        response = httpx.post(live.url + "/generate", json={"prefix": "A", "max_gen_len": 2})
        assert response.status_code == 503 and "KeyError" in response.text


def test_a_huge_single_word_prompt_answers_in_seconds_while_health_stays_responsive(server):
    import concurrent.futures

    body = {"prefix": "the" * 300_000, "max_gen_len": 2}  # one 900 KB pre-token: quadratic BPE took tens of minutes
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        started = time.perf_counter()
        big = pool.submit(httpx.post, server.url + "/generate", json=body, timeout=60)
        time.sleep(0.3)
        health = [httpx.get(server.url + "/health", timeout=5) for _ in range(3)]  # answered meanwhile
        response = big.result()
    assert response.status_code == 422 and "at most" in response.json()["error"]["message"]
    assert time.perf_counter() - started < 30 and all(h.status_code == 200 for h in health)


def test_every_start_up_failure_is_one_line_within_seconds(checkpoint, tiny_tokenizer, tmp_path):
    import socket
    import subprocess

    from checkpoints import save_checkpoint
    from gpt_model import GPTConfig
    from model_heads import GPTClassifier, GPTRewardModel

    config = GPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer), max_seq_len=CONTEXT, dropout=0.0)
    reward, classifier, garbage = tmp_path / "reward.pth", tmp_path / "classifier.pth", tmp_path / "garbage.pth"
    for path, model, extra in ((reward, GPTRewardModel(config), {"model_class": "reward"}),
                               (classifier, GPTClassifier(config, 2, ["a", "b"]), {"model_class": "classifier"})):
        save_checkpoint(path, model, tokenizer_fingerprint=tiny_tokenizer.fingerprint, **extra)
    tiny_tokenizer.save(tmp_path / "tokenizer")
    garbage.write_bytes(b"not a checkpoint")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    cases = [(["--model_path", str(reward)], "reward model"), (["--model_path", str(classifier)], "classifier"),
             (["--model_path", str(garbage)], "corrupt"), (["--port", "99999"], "TCP port"),
             (["--host", "no.such.host.invalid"], "cannot be resolved"),
             (["--port", str(busy.getsockname()[1])], "cannot listen")]
    runs: list[subprocess.Popen] = []
    try:  # all at once: each start-up is mostly torch's import, which the two cores share
        for flags, _ in cases:  # each its own port: the cases that get past the port must not collide there
            argv = ["--model_path", str(checkpoint), "--num_threads", "1", "--port", str(free_port()), *flags]
            runs.append(subprocess.Popen([sys.executable, "-m", "inference.api_service", *argv], text=True,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT))
        for run, (_, message) in zip(runs, cases):
            _, stderr = run.communicate(timeout=60)
            last = stderr.strip().splitlines()[-1]
            assert run.returncode == 2 and last.startswith("error: ") and message in last, stderr
            assert "Traceback" not in stderr
    finally:
        busy.close()
        for run in runs:
            run.kill()  # a no-op for those that exited


@pytest.mark.parametrize("setting, field, template, expected", [
    ("on", True, "chat", True), ("on", False, "chat", False), ("off", True, "chat", False),
    ("on", True, "before_tools", False), ("on", True, "instruction", False)])
def test_the_calculator_runs_for_a_model_trained_with_it_unless_the_server_or_the_request_turns_it_off(
        setting, field, template, expected, tiny_tokenizer):
    from types import SimpleNamespace

    from inference.api_service import sampling
    from inference.schemas import ChatRequest
    from inference.settings import Settings
    from prompts import CHAT_TEMPLATE, CHAT_TEMPLATE_NO_TOOLS, SFT_TEMPLATE

    templates = {"chat": CHAT_TEMPLATE, "before_tools": CHAT_TEMPLATE_NO_TOOLS, "instruction": SFT_TEMPLATE}
    served = SimpleNamespace(template=templates[template], context=64, vocab_size=len(tiny_tokenizer),
                             tokenizer=tiny_tokenizer)
    body = ChatRequest(messages=[{"role": "user", "content": "1+1?"}], calculator=field)
    params = sampling(Settings(calculator=setting), served, body, [0, 1], 8)
    assert params.calculator is expected
    with pytest.raises(ValueError, match="calculator"):
        ChatRequest(messages=[{"role": "user", "content": "x"}], calculator="sometimes")
