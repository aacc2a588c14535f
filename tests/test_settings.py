"""inference.settings: the server's settings, each a flag and an environment variable with one default, and the
default model it serves."""
from __future__ import annotations

from pathlib import Path

import pytest

import inference.settings as service
from cli import UsageError
from inference.settings import SETTINGS, Settings, as_text


def test_as_text_writes_a_default_as_the_environment_holds_it():
    assert [as_text(v) for v in (120.0, 7.5, 4, None, "int8")] == ["120", "7.5", "4", "None", "int8"]
    assert all(s.flag.startswith("--") and s.env.startswith("GPT_") and s.help for s in SETTINGS)


def test_an_environment_variable_is_parsed_as_its_flag_would_be():
    parser = service.build_parser({"GPT_MAX_BATCH_SIZE": "4"})
    assert parser.parse_args([]).max_batch_size == 4  # text from the environment, parsed to an int
    assert parser.parse_args(["--max_batch_size", "2"]).max_batch_size == 2  # the flag wins


def test_flags_and_environment_give_the_same_settings(shared):
    checkpoint = shared["ckpt"]
    env = {"GPT_MODEL_PATH": str(checkpoint), "GPT_MAX_BATCH_SIZE": "4", "GPT_REQUEST_TIMEOUT": "7.5",
           "GPT_API_KEY": "k", "GPT_QUANTIZE": "int8"}
    from_env = Settings.from_args([], environ=env)
    from_flags = Settings.from_args(["--model_path", str(checkpoint), "--max_batch_size", "4", "--request_timeout",
                                     "7.5", "--api_key", "k", "--quantize", "int8"], environ={})
    assert from_env == from_flags and from_env.max_batch_size == 4 and from_env.request_timeout == 7.5
    assert {env_name for _, env_name, *_ in SETTINGS} >= {"GPT_MODEL_PATH", "GPT_API_KEY", "GPT_MAX_BATCH_SIZE",
                                                         "GPT_MAX_QUEUE", "GPT_QUANTIZE", "GPT_REQUEST_TIMEOUT",
                                                         "GPT_REWARD_MODEL", "GPT_MAX_BEST_OF"}
    assert Settings.from_args([], environ={"GPT_REWARD_MODEL": "r.pth", "GPT_MAX_BEST_OF": "3"}) == \
        Settings.from_args(["--reward_model", "r.pth", "--max_best_of", "3"], environ={})


def test_the_compile_setting_offers_the_engines_modes():
    from decoding import COMPILE_MODES

    assert Settings().compile == "auto" and Settings.from_args([], environ={"GPT_COMPILE": "off"}).compile == "off"
    assert set(Settings.__dataclass_fields__["compile"].metadata["choices"]) == set(COMPILE_MODES)


def test_speculative_decoding_is_off_unless_asked():
    assert Settings().speculative == 0
    assert Settings.from_args([], environ={"GPT_SPECULATIVE": "4"}) == Settings.from_args(["--speculative", "4"],
                                                                                          environ={})


def test_default_model_prefers_int8_sft_then_sft_then_pretrain(tmp_path, monkeypatch):
    monkeypatch.setattr(service, "ROOT", tmp_path)
    with pytest.raises(UsageError, match="no model to serve"):
        service.Settings().resolved_model_path()
    for name in ("models/pretrain/pretrain_best.pth", "models/sft/sft_best.pth", "models/sft/sft_best_int8.pth"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
        if name.startswith("models/pretrain"):
            with pytest.warns(UserWarning, match="pretrained model"):
                assert service.Settings().resolved_model_path() == tmp_path / name
        else:
            assert service.Settings().resolved_model_path() == tmp_path / name
    assert service.Settings(model_path="x.pth").resolved_model_path() == Path("x.pth")
