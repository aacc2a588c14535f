"""The server's settings: `Settings`, the one place where each setting's default, type, GPT_* environment variable
and help text live (``cli.setting`` fields, as every command's settings); the command-line parser built from it
(every flag defaults to its variable, so `uvicorn inference.api_service:app`, environment only, and
`python -m inference.api_service` read the same settings); and which checkpoint to serve when none is named.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from cli import ArgumentParser, UsageError, nonnegative_float, nonnegative_int, positive_float, positive_int, setting
from cli import port as cli_port

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODELS = ("models/sft/sft_best_int8.pth", "models/sft/sft_best.pth")
FALLBACK_MODEL = "models/pretrain/pretrain_best.pth"
PROG = "python -m inference.api_service"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


@dataclass(frozen=True)
class Settings:
    """The server's settings, from flags or GPT_* environment variables (`Settings.from_args`) or given directly."""

    model_path: str = setting("", "checkpoint (.pth, float or INT8); default: "
                              "models/sft/sft_best_int8.pth, else models/sft/sft_best.pth, else "
                              "models/pretrain/pretrain_best.pth (warning)", env="GPT_MODEL_PATH")
    tokenizer_dir: str = setting("", "tokenizer folder (default: <checkpoint folder>/tokenizer)",
                                 env="GPT_TOKENIZER_DIR")
    host: str = setting("127.0.0.1", "address to bind (0.0.0.0 to accept other machines, as in Docker)",
                        env="GPT_HOST")
    port: int = setting(8000, "TCP port (1 to 65535)", cli_port, env="GPT_PORT")
    device: str = setting("auto", "auto (cuda, else mps, else cpu), cpu, cuda, cuda:1, mps", env="GPT_DEVICE")
    dtype: str = setting("auto", "compute precision: auto (bf16/fp16 on CUDA, fp32 elsewhere), float32, "
                         "bfloat16, float16 (autocast; weights stay as loaded)", env="GPT_DTYPE")
    quantize: str = setting("none", "none, or int8: quantize a float checkpoint's weights at startup "
                            "(INT8 checkpoints load as INT8 either way)", choices=("none", "int8"), env="GPT_QUANTIZE")
    compile: str = setting("auto", "the decode step: auto (on where that measured faster in the server; so far "
                           "nowhere: off), on (torch.compile: its graphs compile at start-up, before "
                           "/health says ok, and are kept on disk for the next start), static (the same shapes, "
                           "eager), off",
                           choices=("auto", "on", "static", "off"), env="GPT_COMPILE")
    max_batch_size: int = setting(32, "sequences decoded together (KV-cache slots)",
                                  positive_int, env="GPT_MAX_BATCH_SIZE")
    max_queue: int = setting(128, "requests waiting for a slot; beyond it: 429", nonnegative_int, env="GPT_MAX_QUEUE")
    max_prompt_tokens: int = setting(0, "longest prompt accepted, in tokens (0 = the model's context minus one)",
                                     nonnegative_int, env="GPT_MAX_PROMPT_TOKENS")
    max_new_tokens: int = setting(512, "largest max_gen_len / max_tokens a request may ask",
                                  positive_int, env="GPT_MAX_NEW_TOKENS")
    request_timeout: float = setting(120.0, "seconds a request may take, queue included; "
                                     "beyond it: 504 and its slot is freed", positive_float, env="GPT_REQUEST_TIMEOUT")
    api_key: str = setting("", "require `Authorization: Bearer KEY` on every route but /health "
                           "(prefer the variable: a flag shows in the process list)", env="GPT_API_KEY")
    max_body_bytes: int = setting(1 << 20, "largest request body; beyond it: 413", positive_int,
                                  env="GPT_MAX_BODY_BYTES")
    shutdown_timeout: float = setting(30.0, "on SIGTERM, seconds to let in-flight requests finish before "
                                      "ending them, each with its final event (an error event, a 503)",
                                      nonnegative_float, env="GPT_SHUTDOWN_TIMEOUT")
    num_threads: int = setting(0, "torch CPU threads of the decode engine (0 = torch's default: every core)",
                               nonnegative_int, env="GPT_NUM_THREADS")
    reward_model: str = setting("", "reward-model checkpoint that picks the best of a request's "
                                "best_of samples (trained with the served model's tokenizer); unset: the highest "
                                "mean token log-prob under the served model (OpenAI's rule)", env="GPT_REWARD_MODEL")
    max_best_of: int = setting(8, "largest best_of a request may ask: samples generated (and "
                               "tokens spent) for one answer", positive_int, env="GPT_MAX_BEST_OF")
    log_level: str = setting("info", "server log level: " + ", ".join(LOG_LEVELS),
                             choices=LOG_LEVELS, env="GPT_LOG_LEVEL")
    calculator: str = setting("on", "on: run the built-in calculator when a model trained with tool calls calls it "
                              "(its call and result are part of the answer's text; a request turns it off with "
                              "\"calculator\": false); off: never", choices=("on", "off"), env="GPT_CALCULATOR")
    prefix_cache: str = setting("on", "on: a prompt that starts with tokens a slot holds or held (the earlier turns "
                                "of a chat, a shared system message) reuses their keys/values instead of computing "
                                "them again; off: every prompt is prefilled whole", choices=("on", "off"),
                                env="GPT_PREFIX_CACHE")
    speculative: int = setting(0, "speculative decoding: while one request runs alone, up to K prompt-lookup draft "
                               "tokens checked per forward pass (the same greedy tokens, the same sampling "
                               "distribution); 0 = off", nonnegative_int, env="GPT_SPECULATIVE")

    def __post_init__(self) -> None:
        for f in fields(self):
            choices, value = f.metadata["choices"], getattr(self, f.name)
            if choices and value not in choices:
                raise UsageError(f"--{f.name} must be {', '.join(choices[:-1])} or {choices[-1]}, got {value!r}")

    def __repr__(self) -> str:  # the API key never reaches a log line
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["api_key"] = "***" if self.api_key else ""
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
        """Flags first, then the GPT_* variables of `environ` (default: os.environ), then the defaults."""
        return cls(**vars(build_parser(environ).parse_args(argv)))

    def resolved_model_path(self) -> Path:
        """The checkpoint to serve: the configured one, else the first default that exists."""
        if self.model_path:
            return Path(self.model_path)
        for candidate in DEFAULT_MODELS:
            if (ROOT / candidate).is_file():
                return ROOT / candidate
        if (ROOT / FALLBACK_MODEL).is_file():
            warnings.warn(f"no SFT model in models/sft/; serving the pretrained model {FALLBACK_MODEL}", stacklevel=2)
            return ROOT / FALLBACK_MODEL
        candidates = ", ".join(DEFAULT_MODELS + (FALLBACK_MODEL,))
        raise UsageError(f"no model to serve: none of {candidates} exists; train one (python pretrain_trainer.py) "
                         "or pass --model_path / GPT_MODEL_PATH")


class Setting(NamedTuple):
    """One setting as its flag and its variable see it; the default is text, as an environment variable holds it."""

    flag: str
    env: str
    default: str
    parse: Callable[[str], Any]
    help: str


def as_text(value: Any) -> str:
    """A default as it would be written in the environment (120.0 -> "120")."""
    return f"{value:g}" if isinstance(value, float) else str(value)


SETTINGS = tuple(Setting(f"--{f.name}", f.metadata["env"], as_text(f.default), f.metadata["type"] or str,
                         f.metadata["help"])
                 for f in fields(Settings))


def build_parser(environ: Mapping[str, str] | None = None) -> ArgumentParser:
    """The parser of every setting; a flag's default is its variable in `environ` (default: os.environ), if set."""
    environ = os.environ if environ is None else environ
    parser = ArgumentParser(prog=PROG, description="Serve a GPTModel checkpoint over HTTP: /generate, an "
                            "OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models), /health and "
                            "/metrics. Each flag also reads the environment variable in brackets.")
    for s in SETTINGS:  # a default given as text is parsed like the flag's own value (argparse)
        parser.add_argument(s.flag, type=s.parse, default=environ.get(s.env, s.default),
                            help=f"{s.help} [{s.env}, default: {s.default or 'unset'}]")
    return parser
