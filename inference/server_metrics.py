"""The server's Prometheus metrics (`Metrics`): requests by endpoint and status, tokens, finished sequences by
reason, time to first token, latency, batch size, queue depth and active sequences, in a registry of their own
(one per app, so several apps in one process, as in the tests, count separately)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """The server's Prometheus metrics, in a registry of their own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gpt_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("gpt_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("gpt_generated_tokens", "tokens generated (every best_of sample)",
                                        registry=r)
        self.finished = Counter("gpt_sequences_finished", "sequences that left the engine, by reason "
                                "(eos, stop, length, aborted, timeout, error)", ["reason"], registry=r)
        self.ttft = Histogram("gpt_time_to_first_token_seconds", "arrival to first generated token", registry=r,
                              buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.latency = Histogram("gpt_request_latency_seconds", "arrival to last token", registry=r,
                                 buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120))
        self.batch_size = Histogram("gpt_batch_size", "sequences per decode step", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.queue_depth = Gauge("gpt_queue_depth", "requests waiting for a slot", registry=r)
        self.active = Gauge("gpt_active_sequences", "sequences in the running batch", registry=r)
