"""A GPU box's check of what users run there, in at most --max_minutes (8): the device and precision the project
picks; GPT-2 124M (12 x 768, vocab 50,257, context 1,024) trained by pretrain_trainer.py with bf16 + torch.compile +
fused AdamW (tokens/s and MFU after warm-up, peak memory), the same without compile, and with fp16 + GradScaler; a
torchrun job killed with SIGKILL mid-run and resumed with --resume auto; a process-group collective (NCCL); decode
tokens/s at batch 1 and 32 in fp32 / bf16 / INT8 through the project's engine and through transformers on the
exported model; the server (inference.api_service) at 1 / 8 / 32 concurrent users (bench_server's load).

Writes ONE JSON file (--output) and prints the same object as one JSON line. Each step runs in a process of its own
with a timeout: a step that fails or times out is recorded with its error and the others still run (the exit
status is then 1). --dry_run runs every step on the CPU with tiny sizes (fp32 training, no compile, gloo) in a
few minutes; without it, a machine with no CUDA GPU is an error.

    python -m benchmarks.gpu_check                  # on a GPU box -> benchmarks/results/gpu_check.json
    python -m benchmarks.gpu_check --dry_run        # CPU, tiny sizes -> benchmarks/results/gpu_check_dry_run.json
    python -m benchmarks.gpu_check --steps device,prepare,decode --work_dir /tmp/gpu_check   # some steps, files kept
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

import cli
import pretrain_trainer
from atomic_file import atomic_path
from benchmarks.bench_server import PROMPTS, free_port, measure
from benchmarks.cli_options import benchmark_parser
from byte_level_bpe import ByteLevelBPETokenizer
from checkpoints import checkpoint_metadata, load_model_and_tokenizer, save_checkpoint
from decoding import DecodeEngine, SamplingParams
from devices import autocast_context, resolve_device, resolve_dtype, set_threads
from gpt_model import GPTConfig, GPTModel
from inference.export import export_checkpoint
from optimizers import configure_optimizer
from run_folder import read_metrics, step_checkpoints
from training import peak_flops

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "pretrain" / "train.txt"
STEPS = ("device", "prepare", "train_compiled", "train_eager", "train_fp16", "torchrun_resume", "collective", "decode",
         "server")
NEEDS_PREPARE = {"train_compiled", "train_eager", "train_fp16", "torchrun_resume", "decode", "server"}
TIMEOUTS = {"device": 90, "prepare": 120, "train_compiled": 240, "train_eager": 150, "train_fp16": 150,
            "torchrun_resume": 240, "collective": 90, "decode": 240, "server": 180}  # seconds, each cut to what is left
MIN_STEP_SECONDS = 15  # a step with less time left than this is skipped, not started
STOP_GRACE_SECONDS = 15  # a timed-out step gets SIGTERM (servers and torchrun stop with it), then SIGKILL


class StepError(RuntimeError):
    """A step that could not produce its figures; the message is what the results file records."""


@dataclass(frozen=True)
class Sizes:
    """What the steps run: the model, data, training and decoding sizes of the full check or of the dry run."""

    device: str
    preset: str
    n_layers: int | None  # None: the preset's
    max_seq_len: int
    batch_size: int
    vocab_size: int
    min_frequency: int  # 1 lets the embedded corpus give GPT-2's 50,257 tokens
    corpus_lines: int | None  # None: the whole embedded corpus
    train_dtype: str  # "auto": the project's default (bf16 on capable GPUs)
    fp16_dtype: str
    compile: bool
    train_steps: int
    log_interval: int  # the first logged window (compilation, warm-up) is left out of tokens/s
    resume_steps: int
    save_interval: int
    prompt_len: int
    new_tokens: int
    decode_batches: tuple[int, ...]
    server_users: tuple[int, ...]
    server_seconds: float


FULL = Sizes(device="cuda", preset="gpt2", n_layers=None, max_seq_len=1024, batch_size=16, vocab_size=50257,
             min_frequency=1, corpus_lines=None, train_dtype="auto", fp16_dtype="fp16", compile=True, train_steps=60,
             log_interval=10, resume_steps=40, save_interval=10, prompt_len=32, new_tokens=128,
             decode_batches=(1, 32), server_users=(1, 8, 32), server_seconds=5.0)
DRY = Sizes(device="cpu", preset="tiny", n_layers=2, max_seq_len=64, batch_size=8, vocab_size=512, min_frequency=2,
            corpus_lines=3000, train_dtype="fp32", fp16_dtype="fp16", compile=False, train_steps=12, log_interval=4,
            resume_steps=60, save_interval=5, prompt_len=8, new_tokens=16, decode_batches=(1, 32),
            server_users=(1, 8, 32), server_seconds=1.0)


@dataclass(frozen=True)
class Check:
    """One step's world: its sizes, the shared work folder (data, tokenizer, model, runs, logs), CPU threads."""

    sizes: Sizes
    work: Path
    num_threads: int | None = None

    @property
    def train_file(self) -> Path:
        return self.work / "data" / "train.txt"

    @property
    def tokenizer_dir(self) -> Path:
        return self.work / "tokenizer"

    @property
    def model_path(self) -> Path:
        """The decode and server model: the training shape with random weights (speed does not depend on them)."""
        return self.work / "model" / "model.pth"

    @property
    def device(self) -> torch.device:
        return torch.device(self.sizes.device)

    def run_dir(self, name: str) -> Path:
        """A step's own scratch folder, empty at its start (an earlier try's files would be resumed from)."""
        folder = self.work / "runs" / name
        shutil.rmtree(folder, ignore_errors=True)
        return folder


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def harmonic_mean(values: list[float]) -> float | None:
    """The rate over windows of equal work (tokens): total work / total time."""
    return len(values) / sum(1 / v for v in values) if values and all(v > 0 for v in values) else None


def guarded(errors: dict[str, str], key: str, compute: Callable[[], object]) -> object:
    """compute(), or None with its error recorded under key: one failed figure does not lose the step's others."""
    try:
        return compute()
    except Exception as err:  # noqa: BLE001 - every failure of a figure is a result to record, not a crash
        errors[key] = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:500]
        return None


# ----------------------------------------------------------------------------- device


def flash_sdpa(device: torch.device, dtype: torch.dtype) -> dict:
    """Whether SDPA's flash kernel runs causal attention of the training shape's heads (64 wide) in the training
    dtype, and how far it is from the math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(2, 4, 128, 64, device=device, dtype=dtype, generator=generator) for _ in range(3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with sdpa_kernel(SDPBackend.MATH):
        math_out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return {"flash_sdpa": True, "flash_vs_math_max_abs": round(float((flash - math_out).abs().max()), 5)}


def step_device(check: Check) -> dict:
    """The device and dtype the project picks by default, the GPU, fused AdamW and the flash SDPA kernel."""
    device = resolve_device("cpu" if check.sizes.device == "cpu" else "auto")
    dtype = resolve_dtype("auto", device)
    out: dict = {"torch": torch.__version__, "cuda_runtime": torch.version.cuda, "device": str(device),
                 "default_dtype": dtype_name(dtype), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), bf16_supported=torch.cuda.is_bf16_supported(),
                   peak_bf16_flops=peak_flops(device), nccl_available=dist.is_nccl_available())
    optimizer = configure_optimizer(torch.nn.Linear(8, 8).to(device), 0.1, 1e-3, device_type=device.type)
    out["fused_adamw"] = bool(optimizer.defaults.get("fused"))  # the optimizer the trainer builds, on this device
    errors: dict[str, str] = {}
    out.update(guarded(errors, "flash_sdpa", lambda: flash_sdpa(device, dtype)) or {"flash_sdpa": False})
    return {**out, "errors": errors}


# ----------------------------------------------------------------------------- prepare


def step_prepare(check: Check) -> dict:
    """The training text, a tokenizer trained on it, and the decode/server model (random weights, the training shape)
    saved as a checkpoint with its tokenizer beside it."""
    s = check.sizes
    with open(CORPUS, encoding="utf-8") as f:
        lines = [line.rstrip("\n") for i, line in enumerate(f) if s.corpus_lines is None or i < s.corpus_lines]
    check.train_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(check.train_file) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer = ByteLevelBPETokenizer(vocab_size=s.vocab_size)
    tokenizer.train(lines, min_frequency=s.min_frequency, show_progress=False)
    tokenizer.save(check.tokenizer_dir)
    overrides = {"n_layers": s.n_layers} if s.n_layers else {}
    config = GPTConfig.from_preset(s.preset, vocab_size=len(tokenizer), max_seq_len=s.max_seq_len,
                                   pad_token_id=tokenizer.pad_token_id, **overrides)
    torch.manual_seed(0)
    model = GPTModel(config)
    save_checkpoint(check.model_path, model, tokenizer_fingerprint=tokenizer.fingerprint)
    tokenizer.save(check.model_path.parent / "tokenizer")
    return {"corpus_lines": len(lines), "vocab_size": len(tokenizer), "parameters": model.num_parameters(),
            "shape": {k: getattr(config, k) for k in ("n_layers", "d_model", "n_heads", "d_ff", "max_seq_len")}}


# ----------------------------------------------------------------------------- training


def train_flags(check: Check, output_dir: Path, dtype: str, compile: bool, steps: int) -> list[str]:
    """pretrain_trainer.py's flags for a check run: the prepared data and tokenizer, the check's shape, AdamW (fused on
    CUDA and CPU), no evaluation and no samples (neither is part of tokens/s)."""
    s = check.sizes
    flags = ["--train_data_dir", str(check.train_file), "--val_data_dir", "none",
             "--tokenizer_dir", str(check.tokenizer_dir), "--preset", s.preset, "--max_seq_len", str(s.max_seq_len),
             "--batch_size", str(s.batch_size), "--max_steps", str(steps), "--log_interval", str(s.log_interval),
             "--samples", "0", "--output_dir", str(output_dir), "--dtype", dtype, "--optimizer", "adamw",
             "--device", s.device]
    if s.n_layers:
        flags += ["--n_layers", str(s.n_layers)]
    if compile:
        flags.append("--compile")
    if check.num_threads:
        flags += ["--num_threads", str(check.num_threads)]
    return flags


def peak_memory(device: torch.device) -> dict:
    """The step's peak: CUDA memory allocated (and reserved by the caching allocator), or the process's CPU RSS."""
    if device.type == "cuda":
        return {"peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2)}
    return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}  # KiB on Linux


def trained_parameters(output_dir: Path) -> int:
    """Parameters of the model a run saved last (built on the meta device from its config: no weights read)."""
    config = GPTConfig.from_dict(checkpoint_metadata(step_checkpoints(output_dir, "pretrain")[-1])["config"])
    with torch.device("meta"):
        return GPTModel(config).num_parameters()


def train_step(check: Check, name: str, dtype: str, compile: bool) -> dict:
    """pretrain_trainer.py run in this process with a user's flags, then its metrics: tokens/s and MFU over the logged
    windows after the first (which holds compilation and warm-up), the final loss, the peak memory."""
    s, device = check.sizes, check.device
    output_dir = check.run_dir(name)
    flags = train_flags(check, output_dir, dtype, compile, s.train_steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    code = pretrain_trainer.main(flags)
    seconds = time.perf_counter() - started
    if code != 0:
        raise StepError(f"pretrain_trainer.py exited with status {code} (its error is in the step's log)")
    rows = [r for r in read_metrics(output_dir / "metrics.jsonl") if "tokens_per_sec" in r]
    measured = [r for r in rows if r["step"] > s.log_interval]
    if not measured:
        raise StepError(f"no logged step after the warm-up window in {output_dir / 'metrics.jsonl'}")
    mfu = harmonic_mean([r["mfu"] for r in measured if "mfu" in r])
    return {"command": "python pretrain_trainer.py " + " ".join(flags),
            "dtype": dtype_name(resolve_dtype(dtype, device)), "compile": compile,
            "parameters": trained_parameters(output_dir), "steps": rows[-1]["step"],
            "measured_steps": rows[-1]["step"] - s.log_interval, "tokens_per_step": s.batch_size * s.max_seq_len,
            "tokens_per_sec": round(harmonic_mean([r["tokens_per_sec"] for r in measured]), 1),
            "mfu": round(mfu, 4) if mfu is not None else None, "final_train_loss": round(rows[-1]["train_loss"], 4),
            "wall_seconds": round(seconds, 1), **peak_memory(device)}


# ----------------------------------------------------------------------------- torchrun: kill and resume


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (Linux /proc), whatever its session: torchrun starts its workers in sessions of
    their own, out of reach of a signal to the launcher's process group."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # after "(comm)": state, ppid, ...
        except (OSError, IndexError, ValueError):  # a process that ended while being read
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def send(pids: list[int], signum: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:  # already gone
            pass


def running(pid: int) -> bool:
    """Whether a process exists and is not a zombie (killed, not yet reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text(errors="replace").rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    """Until none of ``pids`` runs (a killed worker must not write while the next run starts)."""
    deadline = time.monotonic() + timeout
    while any(running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def stop_tree(proc: subprocess.Popen, grace: float = 0.0) -> None:
    """End a running process and every process below it: SIGTERM first when given a grace period (servers and trainers
    then clean up), SIGKILL to whatever is left. A process already reaped is left alone: its id may be another's."""
    if proc.poll() is not None:
        return
    tree = [proc.pid, *descendants(proc.pid)]  # unreaped, proc's id and children are its own
    if grace:
        send(tree, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            tree += descendants(proc.pid)  # what it started meanwhile
    send(tree if proc.poll() is None else tree[1:], signal.SIGKILL)
    proc.wait()
    wait_gone(tree[1:])


def run_until_checkpoint(command: list[str], output_dir: Path, log: Path, timeout: float) -> int:
    """Start ``command`` in a process group of its own, SIGKILL the whole group as soon as its first step checkpoint
    exists, and return the step of the newest checkpoint then."""
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while not step_checkpoints(output_dir, "pretrain"):
            if proc.poll() is not None:
                raise StepError(f"the first run exited with status {proc.returncode} before its first checkpoint; "
                                f"last output: {log_tail(log)}")
            if time.monotonic() > deadline:
                raise StepError(f"no checkpoint within {timeout:.0f} s")
            time.sleep(0.05)
    finally:
        stop_tree(proc)  # SIGKILL: a crash, not a shutdown the trainer could save on
    return int(checkpoint_metadata(step_checkpoints(output_dir, "pretrain")[-1])["step"])


def step_torchrun_resume(check: Check) -> dict:
    """torchrun --standalone --nproc_per_node 1 pretrain_trainer.py, killed with SIGKILL at its first checkpoint,
    then the same command with --resume auto run to the end."""
    s = check.sizes
    output_dir = check.run_dir("torchrun_resume")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                "pretrain_trainer.py"]
    flags = train_flags(check, output_dir, s.train_dtype, False, s.resume_steps)
    flags += ["--save_interval", str(s.save_interval)]
    started = time.perf_counter()
    killed_at = run_until_checkpoint(launcher + flags, output_dir, check.work / "logs" / "torchrun_first.log",
                                     TIMEOUTS["torchrun_resume"] / 2)
    first_seconds = time.perf_counter() - started
    if killed_at >= s.resume_steps:
        raise StepError(f"the run reached its last step ({killed_at}) before it was killed: raise resume_steps")
    started = time.perf_counter()
    resumed = subprocess.run(launcher + flags + ["--resume", "auto"], cwd=ROOT, capture_output=True, text=True,
                             timeout=TIMEOUTS["torchrun_resume"])
    output = resumed.stdout + resumed.stderr
    if resumed.returncode != 0:
        raise StepError(f"the resumed run exited with status {resumed.returncode}: {tail(output)}")
    if "starting a fresh run" in output:
        raise StepError("--resume auto found no checkpoint and started over")
    final_step = int(checkpoint_metadata(step_checkpoints(output_dir, "pretrain")[-1])["step"])
    logged = [row["step"] for row in read_metrics(output_dir / "metrics.jsonl") if "train_loss" in row]
    errors = {} if final_step == s.resume_steps else {"final_step": f"ended at {final_step}, not {s.resume_steps}"}
    if logged != sorted(set(logged)):  # a resumed run continues the log; one that started over repeats steps
        errors["metrics"] = f"logged steps repeat or go back: {logged}"
    return {"command": "torchrun --standalone --nproc_per_node 1 pretrain_trainer.py " + " ".join(flags),
            "killed_with": "SIGKILL", "killed_after_checkpoint_step": killed_at, "final_step": final_step,
            "steps": s.resume_steps, "first_run_seconds": round(first_seconds, 1),
            "resumed_run_seconds": round(time.perf_counter() - started, 1), "errors": errors}


def step_collective(check: Check) -> dict:
    """A process group of one (NCCL on CUDA, gloo on CPU): all_reduce and broadcast come back unchanged. torchrun
    with one process does not start a group in the trainer (it joins one only with more), so this is the collective
    check a one-GPU box can make."""
    device = check.device
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    started = time.perf_counter()
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        values = torch.arange(1024, dtype=torch.float32, device=device)
        dist.all_reduce(values)
        dist.broadcast(values, src=0)
        same = torch.equal(values.cpu(), torch.arange(1024, dtype=torch.float32))
    finally:
        dist.destroy_process_group()
    seconds = round(time.perf_counter() - started, 2)
    out = {"backend": backend, "world_size": 1, "all_reduce_ok": same, "collective_seconds": seconds}
    if backend == "nccl":
        out["nccl_version"] = ".".join(map(str, torch.cuda.nccl.version()))
    return {**out, "errors": {} if same else {"all_reduce": "a world of one changed the values"}}


# ----------------------------------------------------------------------------- decoding


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def engine_run(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int, device: torch.device,
               dtype: torch.dtype) -> tuple[float, list[list[int]]]:
    """Greedy decoding of every prompt in the project's engine, a slot each, under the run's precision (autocast, as
    the server runs it): (new tokens per second, each prompt's new ids). A short run first warms the kernels."""
    max_len = len(prompts[0]) + new_tokens
    with autocast_context(device, dtype):
        DecodeEngine(model, n_slots=len(prompts), max_len=max_len).run(
            prompts, SamplingParams(max_new_tokens=2, do_sample=False))
        engine = DecodeEngine(model, n_slots=len(prompts), max_len=max_len)
        seconds, requests = timed(lambda: engine.run(prompts, SamplingParams(max_new_tokens=new_tokens,
                                                                             do_sample=False)), device)
    return len(prompts) * new_tokens / seconds, [r.output_ids for r in requests]


def engine_figures(check: Check, prompts: list[list[int]], errors: dict) -> tuple[dict, dict]:
    """tokens/s of the engine on the checkpoint loaded by the project's loader: fp32, bf16 (autocast), and INT8
    weights with the default compute dtype (bf16 on CUDA: the server's default); and the greedy ids of each run."""
    device, figures, ids = check.device, {}, {}
    default = resolve_dtype("auto", device)
    for precision, dtype, quantize in (("fp32", torch.float32, "none"), ("bf16", torch.bfloat16, "none"),
                                       ("int8", default, "int8")):
        model = guarded(errors, f"engine_{precision}", lambda: load_model_and_tokenizer(
            check.model_path, device=device, dtype=dtype, quantize=quantize)[0])
        if model is None:
            continue
        for batch in check.sizes.decode_batches:
            run = guarded(errors, f"engine_{precision}_b{batch}",
                          lambda: engine_run(model, prompts[:batch], check.sizes.new_tokens, device, dtype))
            if run is not None:
                figures[f"engine_{precision}_b{batch}_tok_s"] = round(run[0], 1)
                ids[(precision, batch)] = run[1]
        if quantize == "int8":
            figures["engine_int8_compute_dtype"] = dtype_name(dtype)
            figures["engine_int8_kernel"] = model.lm_head.active_kernel(torch.zeros(1, 1, device=device, dtype=dtype))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return figures, ids


def hf_run(model, prompts: list[list[int]], new_tokens: int, device: torch.device) -> tuple[float, list[list[int]]]:
    """transformers' greedy generate of exactly new_tokens per prompt: (new tokens per second, the new ids)."""
    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)

    def generate(n: int) -> torch.Tensor:
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    with torch.inference_mode():
        generate(2)  # warm-up
        seconds, out = timed(lambda: generate(new_tokens), device)
    return len(prompts) * new_tokens / seconds, out[:, ids.shape[1]:].tolist()


def hf_int8_model(folder: Path, device: torch.device):
    """transformers' INT8 (bitsandbytes LLM.int8) model, or StepError saying why there is none here."""
    if device.type != "cuda":
        raise StepError("not measured: transformers' INT8 (bitsandbytes) runs on CUDA")
    try:
        import bitsandbytes  # noqa: F401 - transformers' INT8 backend; optional, not in the requirements
    except ImportError:
        raise StepError("not measured: transformers' INT8 needs bitsandbytes, which is not installed") from None
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                                                device_map={"": device.index or 0}).eval()


def hf_figures(check: Check, prompts: list[list[int]], errors: dict) -> tuple[dict, dict]:
    """The checkpoint exported with inference.export (--format hf) and decoded by transformers: fp32, bf16 (weights
    in bf16, transformers' way) and INT8 (bitsandbytes, when installed)."""
    from transformers import AutoModelForCausalLM  # heavy, and no other step needs it

    device, figures, ids = check.device, {}, {}
    folder = check.work / "hf"
    shutil.rmtree(folder, ignore_errors=True)
    export_checkpoint(str(check.model_path), "hf", folder)
    loaders = {"fp32": lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval(),
               "bf16": lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(device).eval(),
               "int8": lambda: hf_int8_model(folder, device)}
    for precision, load in loaders.items():
        model = guarded(errors, f"hf_{precision}", load)
        if model is None:
            continue
        for batch in check.sizes.decode_batches:
            run = guarded(errors, f"hf_{precision}_b{batch}",
                          lambda: hf_run(model, prompts[:batch], check.sizes.new_tokens, device))
            if run is not None:
                figures[f"hf_{precision}_b{batch}_tok_s"] = round(run[0], 1)
                ids[(precision, batch)] = run[1]
        del model
    return figures, ids


def step_decode(check: Check) -> dict:
    """Decode tokens/s at each batch size: the project's engine and transformers on the exported model, the same
    random prompts, greedy; and the share of the engine's fp32 tokens that equal transformers' (batch 1)."""
    s = check.sizes
    vocab = GPTConfig.from_dict(checkpoint_metadata(check.model_path)["config"]).vocab_size
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, vocab, (max(s.decode_batches), s.prompt_len), generator=generator).tolist()
    errors: dict[str, str] = {}
    ours, our_ids = engine_figures(check, prompts, errors)
    theirs, their_ids = guarded(errors, "hf_export", lambda: hf_figures(check, prompts, errors)) or ({}, {})
    out = {"prompt_len": s.prompt_len, "new_tokens": s.new_tokens, "greedy": True, **ours, **theirs}
    key = ("fp32", min(s.decode_batches))
    if key in our_ids and key in their_ids:
        pairs = [(a, b) for row_a, row_b in zip(our_ids[key], their_ids[key]) for a, b in zip(row_a, row_b)]
        out["engine_fp32_tokens_equal_hf"] = round(sum(a == b for a, b in pairs) / len(pairs), 3)
    not_measured = {k: v for k, v in errors.items() if "not measured" in v}
    return {**out, "not_measured": not_measured,
            "errors": {k: v for k, v in errors.items() if k not in not_measured}}


# ----------------------------------------------------------------------------- the server


def step_server(check: Check) -> dict:
    """python -m inference.api_service on the prepared model, driven by bench_server's load at each concurrency:
    requests/s, generated tokens/s, time to first token and latency percentiles, mean decode batch, errors."""
    s = check.sizes
    tokenizer = ByteLevelBPETokenizer.from_pretrained(check.model_path.parent / "tokenizer")
    longest = max(1 + len(tokenizer.encode_ordinary(p)) for p in PROMPTS)  # bench_server's prompts, <s> included
    high = min(48, s.max_seq_len - longest)
    max_gen_len = (min(24, high), high)
    levels = list(s.server_users)
    command = [sys.executable, "-m", "inference.api_service", "--model_path", str(check.model_path),
               "--device", s.device, "--max_batch_size", str(max(levels)), "--max_queue", str(4 * max(levels)),
               "--log_level", "warning"]
    if check.num_threads:
        command += ["--num_threads", str(check.num_threads)]
    load = argparse.Namespace(duration=s.server_seconds, seeded=False)
    rows = measure("server", command, {**os.environ, "PYTHONWARNINGS": "ignore"}, load, levels, max_gen_len)
    errors = {level: f"{row['errors']} of {row['requests']} requests failed" for level, row in rows.items()
              if row["errors"]}
    return {"command": " ".join(["python", *command[1:]]), "seconds_per_level": s.server_seconds,
            "max_gen_len": list(max_gen_len), "levels": rows, "errors": errors}


STEP_FUNCTIONS: dict[str, Callable[[Check], dict]] = {
    "device": step_device,
    "prepare": step_prepare,
    "train_compiled": lambda check: train_step(check, "train_compiled", check.sizes.train_dtype, check.sizes.compile),
    "train_eager": lambda check: train_step(check, "train_eager", check.sizes.train_dtype, False),
    "train_fp16": lambda check: train_step(check, "train_fp16", check.sizes.fp16_dtype, False),
    "torchrun_resume": step_torchrun_resume,
    "collective": step_collective,
    "decode": step_decode,
    "server": step_server,
}


# ----------------------------------------------------------------------------- running the steps


def tail(text: str, lines: int = 3, chars: int = 600) -> str:
    """The last few non-empty lines of a process's output (progress bars' carriage returns split lines too)."""
    kept = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return " | ".join(kept[-lines:])[-chars:]


def log_tail(path: Path) -> str:
    return tail(path.read_text(encoding="utf-8", errors="replace")) if path.exists() else "(no output)"


def run_step_here(name: str, check: Check) -> int:
    """One step in this process (started by ``run_step``): its figures, or its error, to <work>/results/<name>.json."""
    result_file = check.work / "results" / f"{name}.json"
    result_file.parent.mkdir(parents=True, exist_ok=True)
    code = 0
    try:
        result = STEP_FUNCTIONS[name](check)
    except (Exception, SystemExit) as err:  # recorded for the results file; the traceback stays in the step's log
        import traceback

        traceback.print_exc()
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        result, code = {"error": f"{type(err).__name__}: {message}"[:600]}, 1
    with atomic_path(result_file) as tmp:
        tmp.write_text(json.dumps(result, default=str), encoding="utf-8")
    return code


def run_step(name: str, argv: list[str], timeout: float, work: Path) -> dict:
    """Run one step as ``python -m benchmarks.gpu_check --step NAME`` in a process group of its own, stopped (with
    everything it started) after ``timeout`` seconds; its result with a status: ok, partial (some figures failed),
    failed or timeout, and the error."""
    (work / "logs").mkdir(parents=True, exist_ok=True)
    result_file, log = work / "results" / f"{name}.json", work / "logs" / f"{name}.log"
    result_file.unlink(missing_ok=True)
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.gpu_check", "--step", name, *argv], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    timed_out = False
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:  # a timeout or Ctrl-C: the step and what it started (its own finally blocks stop its servers and runs)
        stop_tree(proc, STOP_GRACE_SECONDS)
    seconds = round(time.monotonic() - started, 1)
    if timed_out:
        return {"status": "timeout", "seconds": seconds,
                "error": f"no result within {timeout:.0f} s; last output: {log_tail(log)}"}
    result = json.loads(result_file.read_text(encoding="utf-8")) if result_file.exists() else None
    if result is None or "error" in result:
        error = result["error"] if result else f"exit status {proc.returncode}; last output: {log_tail(log)}"
        return {"status": "failed", "seconds": seconds, "error": error}
    return {"status": "partial" if result.get("errors") else "ok", "seconds": seconds, **result}


def run_steps(args: argparse.Namespace, work: Path) -> dict[str, dict]:
    """Every chosen step in order, each within what is left of the --max_minutes budget; a step whose inputs the
    prepare step failed to make is skipped, as is one the budget has no room left for."""
    end = time.monotonic() + args.max_minutes * 60
    child_argv = ["--work_dir", str(work), *(["--dry_run"] if args.dry_run else []),
                  *(["--num_threads", str(args.num_threads)] if args.num_threads else [])]
    results: dict[str, dict] = {}
    bar = tqdm(args.steps, desc="gpu_check", unit="step")
    for name in bar:
        bar.set_postfix_str(name)
        timeout = min(TIMEOUTS[name], end - time.monotonic() - STOP_GRACE_SECONDS)
        if name in NEEDS_PREPARE and results.get("prepare", {}).get("status", "ok") != "ok":
            results[name] = {"status": "skipped", "error": "needs the prepare step, which did not succeed"}
        elif timeout < MIN_STEP_SECONDS:
            results[name] = {"status": "skipped", "error": f"out of time (--max_minutes {args.max_minutes:g})"}
        else:
            results[name] = run_step(name, child_argv, timeout, work)
    bar.close()
    return results


# ----------------------------------------------------------------------------- CLI


def step_list(text: str) -> list[str]:
    """argparse type: comma-separated step names, run in the check's order."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in STEPS]
    if unknown or not names:
        problem = f"unknown step {unknown[0]!r}" if unknown else "no step named"
        raise argparse.ArgumentTypeError(f"{problem}; choose from {', '.join(STEPS)}")
    return [name for name in STEPS if name in names]


step_list.__name__ = "comma-separated steps"


def build_parser() -> cli.ArgumentParser:
    parser = benchmark_parser("benchmarks.gpu_check", __doc__)
    parser.add_argument("--dry_run", action="store_true",
                        help="every step on the CPU with tiny sizes (fp32 training, no compile, gloo): a few minutes")
    parser.add_argument("--output", help="the results file (default: benchmarks/results/gpu_check.json, "
                        "gpu_check_dry_run.json with --dry_run)")
    parser.add_argument("--steps", type=step_list, default=list(STEPS), help="comma-separated steps to run, of: " +
                        ", ".join(STEPS) + " (the decode, server and training steps need prepare's files)")
    parser.add_argument("--max_minutes", type=cli.positive_float, default=8.0,
                        help="wall-clock budget; a step that no longer fits is skipped, one that overruns stopped")
    parser.add_argument("--work_dir", help="where data, tokenizer, models, runs and each step's log go, kept "
                        "(default: a temporary folder, removed at the end)")
    parser.add_argument("--num_threads", type=cli.positive_int, help="torch CPU threads of every step")
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # one step's own process
    return parser


def main(argv: list[str] | None = None) -> int:
    """The check; a bad flag gives one `error:` line and exit 2 (cli.run_cli); exit 1 when a step did not pass."""
    return cli.run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    set_threads(args.num_threads)
    sizes = DRY if args.dry_run else FULL
    if args.step:
        return run_step_here(args.step, Check(sizes, Path(args.work_dir), args.num_threads))
    if not args.dry_run and not torch.cuda.is_available():
        raise cli.UsageError("no CUDA GPU here: run the check on a GPU box, or rehearse it on the CPU with --dry_run")
    output = Path(args.output or ROOT / "benchmarks" / "results" /
                  ("gpu_check_dry_run.json" if args.dry_run else "gpu_check.json"))
    if output.is_dir():
        raise cli.UsageError(f"--output {output} is a folder: pass a file path")
    started, started_utc = time.monotonic(), datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        work = Path(args.work_dir or scratch)
        work.mkdir(parents=True, exist_ok=True)
        steps = run_steps(args, work)
    not_ok = [name for name, result in steps.items() if result["status"] != "ok"]
    results = {"check": "benchmarks.gpu_check", "dry_run": args.dry_run, "started_utc": started_utc,
               "gpu": steps.get("device", {}).get("gpu"), "max_minutes": args.max_minutes,
               "total_seconds": round(time.monotonic() - started, 1), "sizes": asdict(sizes), "steps": steps,
               "not_ok": not_ok}
    output.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(output) as tmp:
        tmp.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(results))
    return 1 if not_ok else 0


if __name__ == "__main__":
    sys.exit(main())
