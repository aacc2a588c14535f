"""benchmarks/gpu_check.py: the --dry_run rehearsal runs every step on the CPU and records it; a failed or timed-out
step is recorded and the others go on; stopping a step ends processes it started in other sessions (as torchrun
starts its workers). On a CUDA machine, what the check exercises there: bf16 autocast training, fused AdamW, flash
SDPA on the model's attention, INT8 decoding's kernel, an NCCL process group."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest
import torch

from benchmarks import gpu_check
from conftest import ROOT
from gpt_model import GPTConfig, GPTModel

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run_check(tmp_path, *flags: str, timeout: float = 280) -> tuple[subprocess.CompletedProcess, dict]:
    output = tmp_path / "gpu_check.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry_run", "--output", str(output),
                          "--work_dir", str(tmp_path / "work"), "--num_threads", "1", *flags],
                         cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    results = json.loads(output.read_text(encoding="utf-8"))
    assert json.loads(run.stdout.strip().splitlines()[-1]) == results  # the one JSON line is the file's object
    return run, results


@pytest.mark.slow
def test_dry_run_runs_every_step_on_the_cpu(tmp_path):
    run, results = run_check(tmp_path)
    steps = results["steps"]
    assert run.returncode == 0, {name: step.get("error") or step.get("errors") for name, step in steps.items()}
    assert list(steps) == list(gpu_check.STEPS) and results["not_ok"] == []
    assert all(step["status"] == "ok" for step in steps.values())
    assert all((tmp_path / "work" / "logs" / f"{name}.log").exists() for name in steps)

    vocab = steps["prepare"]["vocab_size"]
    expected = GPTModel(GPTConfig.from_preset("tiny", n_layers=2, vocab_size=vocab, max_seq_len=64)).num_parameters()
    for name, dtype in (("train_compiled", "float32"), ("train_eager", "float32"), ("train_fp16", "float16")):
        train = steps[name]
        assert train["dtype"] == dtype and train["parameters"] == expected and train["tokens_per_sec"] > 0
        assert train["final_train_loss"] < math.log(vocab)  # 12 steps learn something: below a uniform guess
        assert train["steps"] == gpu_check.DRY.train_steps and train["peak_rss_gib"] > 0

    resume = steps["torchrun_resume"]
    assert resume["killed_after_checkpoint_step"] < resume["final_step"] == gpu_check.DRY.resume_steps
    assert steps["collective"]["backend"] == "gloo" and steps["collective"]["all_reduce_ok"]

    decode = steps["decode"]
    for system in ("engine_fp32", "engine_bf16", "engine_int8", "hf_fp32", "hf_bf16"):
        assert all(decode[f"{system}_b{batch}_tok_s"] > 0 for batch in gpu_check.DRY.decode_batches)
    assert decode["engine_fp32_tokens_equal_hf"] == 1.0  # greedy fp32 on a CPU: the same tokens as transformers
    assert "hf_int8" in decode["not_measured"]  # bitsandbytes runs on CUDA only

    levels = steps["server"]["levels"]
    assert list(levels) == ["u1", "u8", "u32"]
    assert all(level["requests"] > 0 and level["errors"] == 0 for level in levels.values())
    assert levels["u32"]["mean_batch_size"] > 1  # concurrent users share decode steps


@pytest.mark.slow
def test_a_failed_step_is_recorded_and_the_rest_go_on(tmp_path):
    """decode without the prepare step's model fails with its error; the steps around it still run."""
    run, results = run_check(tmp_path, "--steps", "device,decode,collective", timeout=150)
    steps = results["steps"]
    assert run.returncode == 1 and results["not_ok"] == ["decode"]
    assert steps["decode"]["status"] == "failed" and "model.pth" in steps["decode"]["error"]
    assert steps["device"]["status"] == steps["collective"]["status"] == "ok"


def test_a_step_past_its_timeout_is_stopped_and_recorded(tmp_path):
    started = time.monotonic()
    result = gpu_check.run_step("device", ["--dry_run", "--work_dir", str(tmp_path)], 0.2, tmp_path)
    assert result["status"] == "timeout" and "no result within 0 s" in result["error"]
    assert time.monotonic() - started < gpu_check.STOP_GRACE_SECONDS  # SIGTERM ended it: no wait for SIGKILL


def test_stopping_a_step_ends_what_it_started_in_another_session():
    """As torchrun puts its workers in sessions of their own: a signal to the launcher's group would miss them."""
    script = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
              "start_new_session=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.monotonic() + 30
    while not gpu_check.descendants(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    (worker,) = gpu_check.descendants(proc.pid)
    gpu_check.stop_tree(proc)
    assert proc.returncode is not None and not gpu_check.running(worker)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the full check")
def test_the_full_check_without_a_gpu_is_one_error_line(tmp_path, capsys):
    assert gpu_check.main(["--output", str(tmp_path / "out.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no CUDA GPU here")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------- on a CUDA GPU


@needs_cuda
def test_bf16_autocast_training_step_is_finite_and_uses_fused_adamw():
    from devices import autocast_context
    from optimizers import configure_optimizer

    torch.manual_seed(0)
    device = torch.device("cuda")
    model = GPTModel(GPTConfig.from_preset("tiny", vocab_size=512, max_seq_len=64)).to(device)
    optimizer = configure_optimizer(model, 0.1, 1e-3, device_type="cuda")
    assert optimizer.defaults["fused"] is True
    before = model.lm_head.weight.detach().clone()
    ids = torch.randint(0, 512, (4, 64), device=device)
    with autocast_context(device, torch.bfloat16):
        out = model(ids, labels=ids)
    assert out["logits"].dtype == torch.bfloat16 and torch.isfinite(out["loss"])
    out["loss"].backward()
    optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not torch.equal(before, model.lm_head.weight)


@needs_cuda
def test_flash_sdpa_runs_the_models_attention():
    """The training forward (no padding mask: SDPA's causal path) runs with only the flash kernel allowed, and gives
    the logits of the math kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("tiny", vocab_size=512, max_seq_len=128)).cuda().eval()
    ids = torch.randint(0, 512, (2, 128), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash = model(ids)["logits"].float()
        with sdpa_kernel(SDPBackend.MATH):
            reference = model(ids)["logits"].float()
    assert torch.allclose(flash, reference, atol=5e-2, rtol=5e-2)


@needs_cuda
def test_device_step_picks_cuda_and_bf16(tmp_path):
    result = gpu_check.step_device(gpu_check.Check(gpu_check.FULL, tmp_path))
    assert result["device"] == "cuda" and result["fused_adamw"] and result["flash_sdpa"]
    assert result["default_dtype"] == ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")


@needs_cuda
def test_int8_decoding_on_cuda_uses_the_int8pack_kernel():
    from quantization import quantize_model_int8

    torch.manual_seed(0)
    model = quantize_model_int8(GPTModel(GPTConfig.from_preset("tiny", vocab_size=512, max_seq_len=64))).cuda()
    x = torch.zeros(1, 1, model.config.d_model, device="cuda", dtype=torch.bfloat16)
    expected = "int8pack" if hasattr(torch, "_weight_int8pack_mm") else "dequant"
    assert model.lm_head.active_kernel(x) == expected
    speed, ids = gpu_check.engine_run(model, [[1, 2, 3]], 8, torch.device("cuda"), torch.bfloat16)
    assert speed > 0 and len(ids[0]) == 8


@needs_cuda
def test_nccl_process_group_of_one(tmp_path):
    result = subprocess.run([sys.executable, "-c", "import json, pathlib; from benchmarks import gpu_check; "
                             f"print(json.dumps(gpu_check.step_collective(gpu_check.Check(gpu_check.FULL, "
                             f"pathlib.Path({str(tmp_path)!r})))))"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["backend"] == "nccl" and out["all_reduce_ok"], result.stderr
