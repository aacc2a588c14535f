"""benchmarks/bench_peers.py without llama.cpp: which servers it starts, and its ratios against llama.cpp's."""
from __future__ import annotations

from pathlib import Path

from benchmarks.bench_peers import build_parser, server_commands, server_ratios


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_servers_run_on_every_thread_and_ours_int8_eager_and_llama_cpp_also_on_one_fewer():
    commands = server_commands(build_parser().parse_args(["--num_threads", "2"]), Path("/models"))
    assert set(commands) == {"ours_fp32_t2", "ours_int8_t1", "ours_int8_t2", "ours_int8_t2_compiled",
                             "llama_cpp_f32_t1", "llama_cpp_f32_t2", "llama_cpp_q8_0_t1", "llama_cpp_q8_0_t2"}
    assert flag(commands["ours_int8_t1"], "--num_threads") == "1"
    assert flag(commands["ours_int8_t2"], "--compile") == "off"
    assert flag(commands["ours_int8_t2_compiled"], "--compile") == "on"
    assert flag(commands["llama_cpp_q8_0_t1"], "--n_threads") == "1"
    one_core = server_commands(build_parser().parse_args(["--num_threads", "1", "--no_compile"]), Path("/models"))
    assert set(one_core) == {"ours_fp32_t1", "ours_int8_t1", "llama_cpp_f32_t1", "llama_cpp_q8_0_t1"}


def test_each_of_ours_is_divided_by_the_better_llama_cpp_run_of_its_precision_at_each_level():
    def run(*tok_s: float) -> dict:
        return {f"u{users}": {"gen_tok_s": value} for users, value in zip((1, 8), tok_s)}

    runs = {"ours_int8_t1": run(40, 100), "ours_int8_t2": run(60, 150), "ours_int8_t2_compiled": run(30, 120),
            "ours_fp32_t2": run(20, 90), "llama_cpp_q8_0_t1": run(50, 60), "llama_cpp_q8_0_t2": run(80, 50),
            "llama_cpp_f32_t1": run(25, 30), "llama_cpp_f32_t2": run(40, 30)}
    ratios = server_ratios(runs, ["u1", "u8"])
    assert ratios == {"ours_int8_t1_over_llama_cpp_q8_0_u1": 0.5, "ours_int8_t2_over_llama_cpp_q8_0_u1": 0.75,
                      "ours_int8_t2_compiled_over_llama_cpp_q8_0_u1": 0.38, "ours_fp32_t2_over_llama_cpp_f32_u1": 0.5,
                      "ours_int8_t1_over_llama_cpp_q8_0_u8": 1.67, "ours_int8_t2_over_llama_cpp_q8_0_u8": 2.5,
                      "ours_int8_t2_compiled_over_llama_cpp_q8_0_u8": 2.0, "ours_fp32_t2_over_llama_cpp_f32_u8": 3.0}
