"""Greedy decoding throughput of the documented Python API against transformers and CTranslate2 (float32, int8), all
holding the same random GPT-2 124M weights; plus the pieces behind the numbers.

Ours is measured the way a user runs it: the weights saved as checkpoints (float, and INT8 by inference.quantizer's
quantize_model_int8), loaded with checkpoints.load_model_and_tokenizer, then decoding.generate: "api_fp32" and
"api_int8", the same prepared weights (quantization.prepare_for_inference) the evaluator, the chat CLI and the server
run on. "ours_fp32" is decoding.generate on the plain nn.Linear training weights, for comparison.

Prints ONE JSON line (CPU). tok_s = batch * new_tokens / seconds, new tokens only, best of --repeats; in each
repeat every system runs once, back to back (a second apart, so no system's idle threads still spin), so they see
the same machine load. CTranslate2 runs in a process of its own: after one of its generate calls, torch in the same
process decoded 2-3x slower (92 -> 34 tokens/s at batch 1, measured here), which made our INT8 look slower than it
is. Also reported:
  - kernel_ms_*_t1: the 49 matmuls of one 124M batch-1 token with each kernel (fp32 nn.Linear layout,
    (in, out) layout, oneDNN-prepacked (PackedLinear), FBGEMM int8, torch._weight_int8pack_mm, int8 dequantize +
    matmul), on --kernel_threads threads: how quantizer.pick_kernel chose;
  - read bandwidth and the bandwidth floor (weight bytes read per token / bandwidth) at batch 1;
  - KV cache vs recompute at batch 1 (recompute estimated from timed single steps, as bench_generate does);
  - the engine with 1, 8 and 32 sequences joining at staggered times (one every --stagger steps);
  - the compiled decode step (DecodeEngine(compile="on"): static shapes, one graph) against the eager one, fp32 and
    INT8, at batch 1 and --compile_batch, with transformers and CTranslate2 in the same alternating rounds (medians),
    and its compile time with a cold and a warm inductor cache (a fresh cache folder, then a second process on it).

    python -m benchmarks.bench_inference --num_threads 2            # ~5-8 minutes on 2 cores
    python -m benchmarks.bench_inference --num_threads 2 --batch_sizes 1 --repeats 1 --compile_shapes ''   # quicker
    nice -n 5 python -m benchmarks.bench_inference --compiled_only  # the compiled step alone: ~5-8 minutes
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import cli
from benchmarks.bench_generate import build_pair, estimate_uncached_seconds
from benchmarks.cli_options import benchmark_parser, positive_ints, presets
from byte_level_bpe import ByteLevelBPETokenizer
from checkpoints import load_model_and_tokenizer, save_checkpoint
from decoding import DecodeEngine, SamplingParams, generate
from gpt_model import PRESETS, GPTConfig, GPTModel
from quantization import PackedLinear, fbgemm_available, quantize_model_int8, quantize_per_channel

SETTLE_SECONDS = 1.0  # between timed runs: the previous system's idle threads stop spinning on the cores


def ct2_generators(hf_folder: Path, threads: int, folder: Path) -> dict:
    """CTranslate2 float32 and int8 generators converted from a saved transformers model (TransformersConverter)."""
    import ctranslate2

    ctranslate2.converters.TransformersConverter(str(hf_folder)).convert(str(folder / "ct2"), force=True)
    return {name: ctranslate2.Generator(str(folder / "ct2"), device="cpu", compute_type=name, intra_threads=threads,
                                        inter_threads=1) for name in ("float32", "int8")}


def save_hf(hf, folder: Path) -> Path:
    """The transformers model with a word-level tokenizer ``t0 t1 ...`` (the converter wants one for the vocabulary)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(hf.config.vocab_size)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                        bos_token="t0", eos_token="t0", unk_token="t0")
    hf.save_pretrained(folder / "hf")
    tokenizer.save_pretrained(folder / "hf")
    return folder / "hf"


def ct2_worker(hf_folder: str, threads: int) -> None:
    """The CTranslate2 side, in a process of its own: after a CTranslate2 generate call, torch in the same process
    ran 2-3x slower (measured here), and a deployment would not mix them either. Reads one JSON request per line
    ({"name", "rows", "n"}), answers the generated ids."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        generators = ct2_generators(Path(hf_folder), threads, Path(tmp))
        print(json.dumps({"ctranslate2": __import__("ctranslate2").__version__}), flush=True)
        for line in sys.stdin:
            request = json.loads(line)
            tokens = [[f"t{i}" for i in row] for row in request["rows"]]
            results = generators[request["name"]].generate_batch(
                tokens, max_length=request["n"], min_length=request["n"], sampling_topk=1, beam_size=1,
                include_prompt_in_result=False)
            print(json.dumps([r.sequences_ids[0] for r in results]), flush=True)


class CT2Process:
    """A running ``ct2_worker``: ``generate(name, prompt, n)`` returns its ids as a tensor."""

    def __init__(self, hf_folder: Path, threads: int):
        import subprocess

        argv = [sys.executable, "-m", "benchmarks.bench_inference", "--ct2_worker", str(hf_folder), "--num_threads",
                str(threads)]
        self.process = subprocess.Popen(argv, cwd=Path(__file__).parent.parent, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self.version = json.loads(self.process.stdout.readline())["ctranslate2"]

    def generate(self, name: str, prompt: torch.Tensor, n: int) -> torch.Tensor:
        self.process.stdin.write(json.dumps({"name": name, "rows": prompt.tolist(), "n": n}) + "\n")
        self.process.stdin.flush()
        return torch.tensor(json.loads(self.process.stdout.readline()))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def kernel_ms(model) -> dict:
    """Milliseconds for the 49 matmuls of one batch-1 token of this shape, per kernel."""
    linears = [m for m in model.transformer.h.modules() if isinstance(m, torch.nn.Linear)] + [model.lm_head]
    weights = [m.weight.detach() for m in linears]
    xs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}
    transposed = [w.t().contiguous() for w in weights]
    packed = [PackedLinear(w, None) for w in weights]
    int8 = [quantize_per_channel(w) for w in weights]
    runs = {"fp32_linear": [lambda w=w: F.linear(xs[w.shape[1]], w) for w in weights],
            "fp32_in_out": [lambda w=w: xs[w.shape[0]] @ w for w in transposed],
            "fp32_packed": [lambda layer=layer: layer(xs[layer.in_features]) for layer in packed],
            "int8_dequant": [lambda q=q, s=s: F.linear(xs[q.shape[1]], q.float()) * s for q, s in int8]}
    if hasattr(torch, "_weight_int8pack_mm"):
        runs["int8_int8pack"] = [lambda q=q, s=s: torch._weight_int8pack_mm(xs[q.shape[1]], q, s) for q, s in int8]
    if fbgemm_available():
        from quantization import Int8Linear

        layers = [Int8Linear.from_linear(m, kernel="fbgemm") for m in linears]
        runs["int8_fbgemm"] = [lambda layer=layer: layer(xs[layer.in_features]) for layer in layers]
    # Best of 5 per matmul, then summed: on a shared box a multi-threaded call that waits for a descheduled
    # thread takes milliseconds, and one such stall would swamp a whole-token figure.
    return {f"kernel_ms_{name}": round(1e3 * sum(min(timed(call)[0] for _ in range(5)) for call in calls), 1)
            for name, calls in runs.items()}


def read_bandwidth() -> float:
    """Bytes per second of a streaming read (sum over 256 MB, best of 5)."""
    data = torch.ones(64 * 1024 * 1024)
    return data.numel() * 4 / min(timed(data.sum)[0] for _ in range(5))


def weight_bytes_per_token(model) -> int:
    """Bytes of matmul weights read once per decode step (embedding rows and LayerNorms are negligible)."""
    total = 0
    for module in [*model.transformer.h.modules(), model.lm_head]:
        for name in ("weight", "weight_t", "scale", "bias"):
            tensor = getattr(module, name, None) if not isinstance(module, torch.nn.LayerNorm) else None
            if isinstance(tensor, torch.Tensor) and module is not model.transformer.h:
                total += tensor.numel() * tensor.element_size()
    return total


def staggered_tok_s(model, n_seqs: int, prompt_len: int, new_tokens: int, stagger: int) -> float:
    """Engine tokens/s while n_seqs sequences join one every `stagger` steps (continuous batching)."""
    generator = torch.Generator().manual_seed(n_seqs)
    prompts = torch.randint(0, model.config.vocab_size, (n_seqs, prompt_len), generator=generator).tolist()
    params = SamplingParams(max_new_tokens=new_tokens, do_sample=False)
    engine = DecodeEngine(model, n_slots=n_seqs, max_len=prompt_len + new_tokens)
    start, step = time.perf_counter(), 0
    while prompts or engine.has_work:
        if prompts and step % stagger == 0:
            engine.add(prompts.pop(0), params)
        engine.step()
        step += 1
    return n_seqs * new_tokens / (time.perf_counter() - start)


def compile_figures(model, prompt: list[int], new_tokens: int) -> dict:
    """Eager vs torch.compile'd decode step (static shapes over the whole cache, as gpt-fast), batch 1."""
    params = SamplingParams(max_new_tokens=new_tokens, do_sample=False)
    out = {}
    for name, compile in (("eager", False), ("compiled", True)):
        mode = "on" if compile else "off"
        engine = DecodeEngine(model, n_slots=1, max_len=len(prompt) + new_tokens, compile=mode)
        first, _ = timed(lambda: engine.run([prompt], params))
        best = min(timed(lambda: engine.run([prompt], params))[0] for _ in range(2))
        out[f"compile_{name}_tok_s"] = round(new_tokens / best, 1)
        if compile:
            out["compile_seconds"] = round(first - best, 1)
    return out


# ----------------------------------------------------------------------------- the compiled decode step

COMPILED_PROMPT, COMPILED_NEW = 16, 48  # 64 positions: one key bucket, one graph per slot count


def compiled_engines(models: dict[str, torch.nn.Module], batch: int) -> dict:
    """Our engines: each model eager ("off") and compiled ("on"), ``batch`` slots."""
    return {f"{name}_{mode}": DecodeEngine(model, n_slots=batch, max_len=COMPILED_PROMPT + COMPILED_NEW, compile=mode)
            for name, model in models.items() for mode in ("off", "on")}


def first_runs(engines: dict, prompts: list[list[int]]) -> dict[str, float]:
    """Seconds of each engine's first run: the compile (or the eager warm-up) and one generation."""
    params = SamplingParams(max_new_tokens=COMPILED_NEW, do_sample=False)
    return {name: round(timed(lambda e=engine: e.run(prompts, params))[0], 1) for name, engine in engines.items()}


def compile_worker(folder: str, threads: int) -> None:
    """A second process on the first one's inductor cache: the compiled engines' first runs with a warm cache."""
    torch.set_num_threads(threads)
    models = {name: load_model_and_tokenizer(Path(folder) / f"{name}.pth", device="cpu")[0]
              for name in ("fp32", "int8")}
    engines = {k: v for k, v in compiled_engines(models, 1).items() if k.endswith("_on")}
    print(json.dumps(first_runs(engines, [list(range(1, COMPILED_PROMPT + 1))])), flush=True)


def alternating_medians(runs: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each run over ``rounds`` rounds, every run once per round, a pause between runs."""
    seconds = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            time.sleep(SETTLE_SECONDS)
            seconds[name].append(timed(run)[0])
    return {name: statistics.median(values) for name, values in seconds.items()}


def compiled_figures(args, ours: GPTModel, hf, folder: Path) -> dict:
    """Eager vs compiled step, fp32 and INT8 (and the INT8 eager step on quantized.linear_dynamic), at batch 1 with
    transformers and CTranslate2 in the same rounds, and INT8 at --compile_batch; compile times, cold and warm cache."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")  # a fresh cache: the cold compile
    models = api_models(ours, folder)
    models = {"fp32": models["api_fp32"], "int8": models["api_int8"]}
    dynamic = quantize_model_int8(copy.deepcopy(ours), kernel="fbgemm")
    prompt = torch.randint(0, 50257, (1, COMPILED_PROMPT), generator=torch.Generator().manual_seed(1))
    engines = {**compiled_engines(models, 1), "int8_dynamic_off": DecodeEngine(dynamic, n_slots=1)}
    out = {f"compile_cold_first_run_s_{k}": v for k, v in first_runs(engines, prompt.tolist()).items()}
    argv = [sys.executable, "-m", "benchmarks.bench_inference", "--compile_worker", str(folder), "--num_threads",
            str(args.num_threads)]
    warm = subprocess.run(argv, cwd=Path(__file__).parent.parent, capture_output=True, text=True, check=True)
    out.update({f"compile_warm_first_run_s_{k}": v for k, v in json.loads(warm.stdout.splitlines()[-1]).items()})
    params = SamplingParams(max_new_tokens=COMPILED_NEW, do_sample=False)
    runs = {f"b1_{name}": (lambda e=e: e.run(prompt.tolist(), params)) for name, e in engines.items()}
    runs["b1_hf_fp32"] = lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                             max_new_tokens=COMPILED_NEW, min_new_tokens=COMPILED_NEW)
    ct2 = None if args.no_ct2 else CT2Process(save_hf(hf, folder), args.num_threads)
    for name in ("float32", "int8") if ct2 else ():
        runs[f"b1_ct2_{name}"] = lambda name=name: ct2.generate(name, prompt, COMPILED_NEW)
    print(json.dumps(out), file=sys.stderr, flush=True)  # the figures so far, should a later stage fail
    medians = alternating_medians(runs, args.compile_rounds)
    if ct2:
        out["ctranslate2"] = ct2.version
        ct2.close()
    out.update({f"{name}_tok_s": round(COMPILED_NEW / sec, 1) for name, sec in medians.items()})
    print(json.dumps(out), file=sys.stderr, flush=True)
    batch = torch.randint(0, 50257, (args.compile_batch, COMPILED_PROMPT), generator=torch.Generator().manual_seed(2))
    wide = compiled_engines({"int8": models["int8"]}, args.compile_batch)  # what the server compiles by default
    out.update({f"compile_cold_first_run_s_b{args.compile_batch}_{k}": v
                for k, v in first_runs(wide, batch.tolist()).items()})
    wide_medians = alternating_medians({k: (lambda e=e: e.run(batch.tolist(), params)) for k, e in wide.items()},
                                       args.compile_rounds)
    out.update({f"b{args.compile_batch}_{k}_tok_s": round(args.compile_batch * COMPILED_NEW / sec, 1)
                for k, sec in wide_medians.items()})
    for kind in ("fp32", "int8"):  # a compile's seconds: its first run less a steady one
        out[f"compile_cold_seconds_b1_{kind}"] = round(out[f"compile_cold_first_run_s_{kind}_on"]
                                                       - medians[f"b1_{kind}_on"], 1)
        out[f"compile_warm_seconds_b1_{kind}"] = round(out[f"compile_warm_first_run_s_{kind}_on"]
                                                       - medians[f"b1_{kind}_on"], 1)
    out[f"compile_cold_seconds_b{args.compile_batch}_int8"] = round(
        out[f"compile_cold_first_run_s_b{args.compile_batch}_int8_on"] - wide_medians["int8_on"], 1)
    return out | compiled_ratios(out, args.compile_batch)


def compiled_ratios(out: dict, batch: int) -> dict:
    """The targets: compiled over eager, INT8 over CTranslate2 int8, fp32 over transformers."""
    ratio = {f"b1_{kind}_compiled_over_eager": out[f"b1_{kind}_on_tok_s"] / out[f"b1_{kind}_off_tok_s"]
             for kind in ("fp32", "int8")}
    ratio["b1_int8_eager_direct_over_dynamic"] = out["b1_int8_off_tok_s"] / out["b1_int8_dynamic_off_tok_s"]
    ratio[f"b{batch}_int8_compiled_over_eager"] = out[f"b{batch}_int8_on_tok_s"] / out[f"b{batch}_int8_off_tok_s"]
    ratio["b1_fp32_compiled_over_hf"] = out["b1_fp32_on_tok_s"] / out["b1_hf_fp32_tok_s"]
    if "b1_ct2_int8_tok_s" in out:
        ratio["b1_int8_compiled_over_ct2_int8"] = out["b1_int8_on_tok_s"] / out["b1_ct2_int8_tok_s"]
        ratio["b1_fp32_compiled_over_ct2_float32"] = out["b1_fp32_on_tok_s"] / out["b1_ct2_float32_tok_s"]
    return {k: round(v, 2) for k, v in ratio.items()}


def build_parser() -> cli.ArgumentParser:
    parser = benchmark_parser("benchmarks.bench_inference", __doc__)
    parser.add_argument("--shape", choices=list(PRESETS), default="gpt2",
                        help="GPTConfig preset (gpt2: the 124M shape)")
    parser.add_argument("--batch_sizes", type=positive_ints(), default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--prompt_len", type=cli.positive_int, default=32, help="prompt tokens per row")
    parser.add_argument("--new_tokens", type=cli.positive_int, default=128, help="greedy tokens generated per row")
    parser.add_argument("--repeats", type=cli.positive_int, default=2, help="timed runs per figure, best kept")
    parser.add_argument("--num_threads", type=cli.positive_int, default=2, help="CPU threads for every system")
    parser.add_argument("--kernel_threads", type=cli.positive_int, default=1,
                        help="CPU threads for the kernel_ms figures")
    parser.add_argument("--stagger", type=cli.positive_int, default=4, help="steps between joining sequences")
    parser.add_argument("--joining", type=positive_ints(allow_empty=True), default="1,8,32",
                        help="sequence counts for the staggered figure ('' = skip)")
    parser.add_argument("--no_ct2", action="store_true", help="skip CTranslate2")
    parser.add_argument("--ct2_worker", metavar="HF_FOLDER", help=argparse.SUPPRESS)  # the CTranslate2 process
    parser.add_argument("--compile_shapes", type=presets(allow_empty=True), default="tiny,gpt2",
                        help="presets for the torch.compile figure, '' = skip")
    parser.add_argument("--compiled_only", action="store_true",
                        help="measure only the compiled decode step against eager and the peers (the --shape model)")
    parser.add_argument("--compile_rounds", type=cli.positive_int, default=5,
                        help="alternating rounds of the compiled-step figures (medians)")
    parser.add_argument("--compile_batch", type=cli.positive_int, default=32,
                        help="the wide batch of the compiled-step figures")
    parser.add_argument("--compile_worker", metavar="FOLDER", help=argparse.SUPPRESS)  # the warm-cache process
    return parser


def main(argv: list[str] | None = None) -> int:
    """The benchmark; a bad flag gives one `error:` line and exit 2 (cli.run_cli)."""
    return cli.run_cli(_main, argv)


def api_models(ours: GPTModel, folder: Path) -> dict[str, torch.nn.Module]:
    """Our weights as a user gets them: saved as float and INT8 checkpoints (with a tokenizer folder), loaded back
    with checkpoints.load_model_and_tokenizer (the one loader, inference-prepared weights)."""
    tokenizer = ByteLevelBPETokenizer(vocab_size=300)  # the loader wants a tokenizer; prompts here are random ids
    tokenizer.train(["the checkpoint loader wants a tokenizer folder beside the checkpoint"] * 4, show_progress=False)
    tokenizer.save(folder / "tokenizer")
    save_checkpoint(folder / "fp32.pth", ours)
    save_checkpoint(folder / "int8.pth", quantize_model_int8(copy.deepcopy(ours)))
    return {"api_fp32": load_model_and_tokenizer(folder / "fp32.pth", device="cpu")[0],
            "api_int8": load_model_and_tokenizer(folder / "int8.pth", device="cpu")[0]}


def best_seconds(runs: dict, repeats: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Each run's best time over ``repeats`` rounds (every run once per round, back to back), and its output."""
    for run in runs.values():  # warm-up: allocators, kernels, FBGEMM packing
        run(n=4)
    best, outputs = {name: float("inf") for name in runs}, {}
    for _ in range(repeats):
        for name, run in runs.items():
            time.sleep(SETTLE_SECONDS)
            seconds, outputs[name] = timed(run)
            best[name] = min(best[name], seconds)
    return best, outputs


def batch_runs(systems: dict, hf, ct2: CT2Process | None, prompt: torch.Tensor, new_tokens: int) -> dict:
    """Greedy generation of ``new_tokens`` for the prompt batch by every system (new tokens only)."""
    mask = torch.ones_like(prompt)
    greedy = SamplingParams(max_new_tokens=new_tokens, do_sample=False)
    runs = {name: (lambda m=m, n=new_tokens: generate(m, prompt, greedy)[:, -n:]) for name, m in systems.items()}
    runs["hf_fp32"] = lambda n=new_tokens: hf.generate(prompt, attention_mask=mask, max_new_tokens=n,
                                                       min_new_tokens=n, do_sample=False)[:, -n:]
    for name in ("float32", "int8") if ct2 else ():
        runs[f"ct2_{name}"] = lambda name=name, n=new_tokens: ct2.generate(name, prompt, n)
    return runs


def batch_figures(batch: int, new_tokens: int, best: dict[str, float], outputs: dict, systems: dict) -> dict:
    """tokens/s of every system, the share of its tokens equal to transformers', and our speed over the peers'."""
    prefix, out = f"cpu_b{batch}", {}
    for name, seconds in best.items():
        out[f"{prefix}_{name}_tok_s"] = round(batch * new_tokens / seconds, 1)
        if name != "hf_fp32":  # share of new tokens equal to transformers' (int8 rounding may change a few)
            agree = (outputs[name] == outputs["hf_fp32"]).float().mean().item()
            out[f"{prefix}_{name}_tokens_equal_hf"] = round(agree, 3)
    for name in systems:
        out[f"{prefix}_{name}_over_hf"] = round(best["hf_fp32"] / best[name], 2)
    for ours_name, ref in (("ours_fp32", "ct2_float32"), ("api_fp32", "ct2_float32"), ("api_int8", "ct2_int8")):
        if ref in best:
            out[f"{prefix}_{ours_name}_over_{ref}"] = round(best[ref] / best[ours_name], 2)
    return out


def decode_figures(args, ours: GPTModel, systems: dict, hf) -> dict:
    """tokens/s of every system at each batch size (CTranslate2 converted from the transformers model)."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ct2 = None if args.no_ct2 else CT2Process(save_hf(hf, Path(tmp)), args.num_threads)
        if ct2:
            results["ctranslate2"] = ct2.version
        for batch in args.batch_sizes:
            prompt = torch.randint(0, 50257, (batch, args.prompt_len), generator=torch.Generator().manual_seed(batch))
            best, outputs = best_seconds(batch_runs(systems, hf, ct2, prompt, args.new_tokens), args.repeats)
            results.update(batch_figures(batch, args.new_tokens, best, outputs, systems))
            if batch == 1:
                uncached = estimate_uncached_seconds(ours, prompt, args.new_tokens, 4, torch.device("cpu"))
                results["cpu_b1_ours_fp32_cache_speedup_est"] = round(uncached / best["ours_fp32"], 1)
        if ct2:
            ct2.close()
    return results


def engine_figures(args, systems: dict) -> dict:
    """Bandwidth floor at batch 1, staggered joining, and torch.compile of the decode step."""
    bandwidth = read_bandwidth()
    results = {"read_bandwidth_gb_s": round(bandwidth / 1e9, 1)}
    for name in ("ours_fp32", "api_int8"):
        weight_bytes = weight_bytes_per_token(systems[name])
        results[f"{name}_weight_mb_per_token"] = round(weight_bytes / 1e6, 1)
        results[f"{name}_b1_floor_tok_s"] = round(bandwidth / weight_bytes, 1)
    for n in args.joining:
        for name in ("api_fp32", "api_int8"):
            results[f"joining_{n}_{name}_tok_s"] = round(
                staggered_tok_s(systems[name], n, args.prompt_len, args.new_tokens, args.stagger), 1)
    for shape in args.compile_shapes:
        torch.manual_seed(0)
        model = GPTModel(GPTConfig.from_preset(shape, vocab_size=50257)).eval()
        prompt = torch.randint(0, 50257, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
        results.update({f"{shape}_{k}": v for k, v in compile_figures(model, prompt, args.new_tokens).items()})
    return results


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.num_threads)
    if args.ct2_worker:
        ct2_worker(args.ct2_worker, args.num_threads)
        return 0
    if args.compile_worker:
        compile_worker(args.compile_worker, args.num_threads)
        return 0
    started = time.perf_counter()
    ours, hf = build_pair(args.shape, torch.device("cpu"))
    results: dict = {"shape": args.shape, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "greedy": True,
                     "cpu_threads": torch.get_num_threads(), "torch": torch.__version__}
    if args.compiled_only:
        results.update({"prompt_len": COMPILED_PROMPT, "new_tokens": COMPILED_NEW, "rounds": args.compile_rounds,
                        "cpu": torch.backends.cpu.get_cpu_capability()})
        with tempfile.TemporaryDirectory() as folder:
            results.update(compiled_figures(args, ours, hf, Path(folder)))
        results["bench_seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(results))
        return 0
    torch.set_num_threads(args.kernel_threads)  # 1: a multi-threaded call on a busy box can stall for milliseconds
    results.update({f"{k}_t{args.kernel_threads}": v for k, v in kernel_ms(ours).items()})
    torch.set_num_threads(args.num_threads)
    with tempfile.TemporaryDirectory() as folder:
        systems = {"ours_fp32": ours, **api_models(ours, Path(folder))}
        results["api_fp32_layers"] = type(systems["api_fp32"].lm_head).__name__
        results["api_int8_kernel"] = systems["api_int8"].lm_head.active_kernel(torch.zeros(1, 1))
        results.update(decode_figures(args, ours, systems, hf))
        results.update(engine_figures(args, systems))
    results["bench_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
