"""Locust load test for inference/api_service.py: /generate (plain and streamed), the OpenAI route and /health.

    locust -f inference/load_test.py --headless -u 50 -r 10 -t 1m --host http://127.0.0.1:8000
    locust -f inference/load_test.py --host http://127.0.0.1:8000          # web UI on http://127.0.0.1:8089

Each simulated user sends a random prompt (Chinese or English) with random max_gen_len / top_k / temperature,
waiting 0.1-1 s between requests. Extra options, spelled with dashes like Locust's own: --max-new-tokens (the
largest max_gen_len a request asks for, >= 8; keep prompt + it within the model's context: 48 suits the default
64-token pretrain model), --api-key (or GPT_API_KEY); a bad value stops Locust before any request. A request fails
on any non-2xx status, a stream without its final event, or a response without text fields. The stream task reports
time to first token as its own row ("generate stream: first token"). Run it from the project root, as every command
here: Locust imports from the folder it runs in, and this file imports the project's ``cli``.
"""
from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, between, events, task

import cli  # the project's argument types: Locust imports from the folder it runs in, the project root

MIN_NEW_TOKENS = 8

PROMPTS = [
    "ROMEO:", "JULIET:", "KING LEAR:", "HAMLET: To be, or not to be", "First Citizen:", "To be or not",
    "Once upon a time", "The quality of mercy", "Shall I compare thee", "Now is the winter",
    "床前明月光，", "春眠不觉晓，", "《静夜思》 李白：", "白日依山尽，", "人工智能是", "今天天气很好，",
    "红豆生南国，",
    "《登鹳雀楼》", "大江东去，", "明月几时有？",
]


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--max-new-tokens", type=cli.int_at_least(MIN_NEW_TOKENS), default=48,
                        help=f"largest max_gen_len a request asks for (>= {MIN_NEW_TOKENS}; default: 48)")
    parser.add_argument("--api-key", default=os.environ.get("GPT_API_KEY", ""), help="API key, if the server has one")


class GPTUser(HttpUser):
    """One client: mostly /generate, some streamed, some through the OpenAI route, a few health checks."""

    wait_time = between(0.1, 1.0)

    def on_start(self) -> None:
        key = self.environment.parsed_options.api_key if self.environment.parsed_options else ""
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"

    def _body(self) -> dict:
        options = self.environment.parsed_options
        top = options.max_new_tokens if options else 48
        return {"prefix": random.choice(PROMPTS), "max_gen_len": random.randint(MIN_NEW_TOKENS, top),
                "top_k": random.choice([0, 10, 50]), "temperature": random.choice([0.0, 0.7, 0.8, 1.0])}

    @task(6)
    def generate(self) -> None:
        with self.client.post("/generate", json=self._body(), name="generate", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}: {response.text[:200]}")
            elif not isinstance(response.json().get("generated_text"), str):
                response.failure("no generated_text in the response")

    @task(3)
    def generate_stream(self) -> None:
        start = time.perf_counter()
        first_token_ms = None
        with self.client.post("/generate", json={**self._body(), "stream": True}, name="generate stream",
                              stream=True, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}: {response.text[:200]}")
                return
            final = None
            for line in response.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data: "):
                    continue
                event = json.loads(line[len("data: "):])
                if first_token_ms is None:
                    first_token_ms = 1000 * (time.perf_counter() - start)
                if "finish_reason" in event or "error" in event:
                    final = event
            if final is None or "error" in final:
                response.failure(f"stream ended without a final event: {final}")
                return
        events.request.fire(request_type="SSE", name="generate stream: first token", response_time=first_token_ms,
                            response_length=0, exception=None, context={})

    @task(2)
    def openai_completion(self) -> None:
        body = self._body()
        payload = {"model": "gpt", "prompt": body["prefix"], "max_tokens": body["max_gen_len"],
                   "temperature": body["temperature"]}
        with self.client.post("/v1/completions", json=payload, name="v1/completions", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}: {response.text[:200]}")
            elif "usage" not in response.json():
                response.failure("no usage in the response")

    @task(1)
    def health(self) -> None:
        self.client.get("/health", name="health")
