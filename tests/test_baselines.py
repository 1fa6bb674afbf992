"""The rule that judges accuracy metrics against their baselines (ptqsuite/baselines.py): an exact McNemar test on
per-example correctness, so a regression fails only when it is larger than the sample explains."""
import math
import random

import pytest

from ptqsuite.baselines import ACCURACY_ALPHA, compare, flip_bound, mcnemar


def record(correct: str) -> dict:
    return {"value": correct.count("1") / len(correct), "n": len(correct), "correct": correct}


def payload(metrics: dict) -> dict:
    return {"metrics": metrics, "reference": {}, "protocol": {"device_class": "cpu-fp32"}, "environment": {}}


def flipped(correct: str, right_to_wrong: int, wrong_to_right: int) -> str:
    """``correct`` with the first ``right_to_wrong`` right answers and first ``wrong_to_right`` wrong ones flipped."""
    out, b, c = list(correct), right_to_wrong, wrong_to_right
    for i, x in enumerate(out):
        if x == "1" and b:
            out[i], b = "0", b - 1
        elif x == "0" and c:
            out[i], c = "1", c - 1
    return "".join(out)


_rng = random.Random(0)
BASE = "".join(_rng.choice("01") for _ in range(400))


def test_p_value_is_the_exact_binomial_tail():
    # 10 flips all one way: 2 * 0.5^10
    b, c, p = mcnemar("1" * 10 + "0" * 5, "0" * 10 + "0" * 5)
    assert (b, c) == (10, 0) and math.isclose(p, 2 * 0.5 ** 10)
    assert mcnemar(BASE, BASE) == (0, 0, 1.0)
    # symmetric in direction, and an even split is no evidence at all
    assert mcnemar(BASE, flipped(BASE, 7, 2))[2] == mcnemar(BASE, flipped(BASE, 2, 7))[2]
    assert mcnemar(BASE, flipped(BASE, 5, 5))[2] == 1.0


def test_a_rerun_with_the_same_answers_passes():
    assert compare(payload({"piqa.acc": record(BASE)}), payload({"piqa.acc": record(BASE)})).ok


def test_a_few_flips_either_way_are_noise():
    """Rounding on other hardware flips near-ties both ways: 6 right -> wrong and 3 back (p = 0.51) pass, though
    the mean moved by 0.75 points."""
    v = compare(payload({"piqa.acc": record(BASE)}), payload({"piqa.acc": record(flipped(BASE, 6, 3))}))
    assert v.ok, v.lines


def test_a_real_drop_fails_with_both_numbers_n_and_the_bound():
    base, now = record(BASE), record(flipped(BASE, 30, 5))
    v = compare(payload({"piqa.acc": base}), payload({"piqa.acc": now}))
    assert not v.ok
    (line,) = v.lines
    assert f"baseline {base['value']:.4f}, measured {now['value']:.4f} (n=400)" in line
    assert "30 examples went right -> wrong and 5 wrong -> right" in line
    assert f"< {ACCURACY_ALPHA}" in line and f"of 35 flips at most {flip_bound(35)} may go one way" in line
    assert "WORSE than baseline" in line


def test_a_real_gain_fails_too_so_baselines_move_on_purpose():
    v = compare(payload({"piqa.acc": record(BASE)}), payload({"piqa.acc": record(flipped(BASE, 2, 30))}))
    assert not v.ok and "better than baseline: if intended, re-record" in v.lines[0]


@pytest.mark.parametrize("d", [8, 10, 20, 35, 100])
def test_the_bound_is_where_the_test_turns(d):
    """At the bound the split passes; one more flip the same way fails."""
    k = flip_bound(d)
    assert mcnemar("1" * k + "0" * (d - k), "0" * k + "1" * (d - k))[2] >= ACCURACY_ALPHA
    assert mcnemar("1" * (k + 1) + "0" * (d - k - 1), "0" * (k + 1) + "1" * (d - k - 1))[2] < ACCURACY_ALPHA


def test_fewer_than_eight_flips_can_never_fail():
    assert all(flip_bound(d) is None for d in range(8)) and flip_bound(8) == 7


def test_another_sample_is_not_comparable():
    v = compare(payload({"piqa.acc": record(BASE)}), payload({"piqa.acc": record(BASE[:200])}))
    assert not v.ok and "the baseline scored 400 examples, this run 200: not comparable" in v.lines[0]
