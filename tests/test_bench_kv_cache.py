"""benchmarks/bench_kv_cache.py: the cache bytes it reports are the hand-worked size of keys and values."""
import json

import pytest

from benchmarks import bench_kv_cache


@pytest.mark.parametrize("preset, kv_heads", [("tiny", 4), ("modern-tiny", 2)])
def test_kv_bytes_per_token_is_two_tensors_per_layer_of_the_kv_heads(preset, kv_heads, tmp_path):
    args = bench_kv_cache.build_parser().parse_args(["--prompt_len", "4", "--new_tokens", "2", "--vocab_size", "64"])
    model = bench_kv_cache.build_model(preset, 64)
    tok_s, per_token = bench_kv_cache.decode_run(model, 3, args)
    head_dim = 128 // 4
    assert per_token == 2 * bench_kv_cache.DEFAULT_LAYERS * kv_heads * head_dim * 4  # keys + values, float32
    assert tok_s > 0


def test_the_run_writes_one_json_line_with_both_shapes(tmp_path, capsys):
    out = tmp_path / "kv.json"
    assert bench_kv_cache.main(["--pairs", "tiny:modern-tiny", "--batch_sizes", "1,2", "--rounds", "1",
                                "--prompt_len", "4", "--new_tokens", "2", "--vocab_size", "64",
                                "--output", str(out)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == json.loads(out.read_text())
    pair = line["pairs"]["tiny:modern-tiny"]
    assert pair["modern-tiny"]["kv_bytes_per_token"] * 2 == pair["tiny"]["kv_bytes_per_token"]  # half the kv heads
    assert {"decode_tok_s_b1", "decode_tok_s_b2"} <= pair["tiny"].keys()
