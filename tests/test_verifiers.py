"""verifiers: each verifier on positive and negative cases (extra text, full-width digits, negative numbers, no
number), the registry, and the combined reward GRPO trains on."""
import pytest

import verifiers


@pytest.mark.parametrize("response, expected", [
    ("42", 1.0), ("答案是 42。", 1.0), ("４２", 1.0), ("the sum is 42", 1.0), ("41", 0.0), ("", 0.0),
    ("no number here", 0.0), ("4 2", 0.0), ("142", 0.0)])
def test_math_verifier(response, expected):
    assert verifiers.math_verifier(response, {"response": "42"}) == expected


def test_math_verifier_reads_negative_numbers_and_the_other_verifiers():
    assert verifiers.math_verifier("结果：−7", {"response": "-7"}) == 1.0
    assert verifiers.math_verifier("7", {"response": "-7"}) == 0.0
    assert verifiers.exact_verifier(" ROMEO \n", {"response": "ROMEO"}) == 1.0
    assert verifiers.exact_verifier("ROMEO!", {"response": "ROMEO"}) == 0.0
    assert verifiers.format_verifier("疑是地上霜", {}) == 1.0
    assert verifiers.format_verifier("a\nb", {}) == 0.0 and verifiers.format_verifier("", {}) == 0.0
    assert verifiers.format_verifier("### 响应:x", {}) == 0.0
    arithmetic = {"response": "137", "task": "arithmetic"}
    assert verifiers.verifiable_reward("答案是 137。", arithmetic, format_weight=0.1) == pytest.approx(1.1)
    assert verifiers.verifiable_reward("答案是 137。", {"response": "137", "task": "speaker"}) == pytest.approx(0.1)


def test_a_registered_verifier_is_used_by_name():
    @verifiers.register_verifier("shouting")
    def shouting(response: str, record: dict) -> float:
        return float(response.isupper())

    try:
        assert verifiers.verifiable_reward("ROMEO", {"response": "x", "verifier": "shouting"}, format_weight=0) == 1.0
        with pytest.raises(ValueError, match="unknown verifier"):
            verifiers.verifiable_reward("x", {"response": "x", "verifier": "missing"})
    finally:
        del verifiers.VERIFIERS["shouting"]
