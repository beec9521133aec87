"""Sampling functions on hand-made distributions."""
import numpy as np
import pytest

from sparserun.errors import SparserunError
from sparserun.sampling import SamplingParams, apply_repeat_penalty, candidates, sample

LOGITS = np.log(np.array([0.5, 0.25, 0.15, 0.07, 0.03], np.float32))


def test_greedy_is_argmax():
    assert sample(LOGITS[::-1].copy(), SamplingParams(temperature=0.0), np.random.default_rng(0)) == 4


def test_top_k_top_p_min_p_candidates():
    assert list(candidates(LOGITS, top_k=2)) == [0, 1]
    assert list(candidates(LOGITS, top_p=0.7)) == [0, 1]  # 0.5 < 0.7 <= 0.75
    assert list(candidates(LOGITS, top_p=0.76)) == [0, 1, 2]
    assert list(candidates(LOGITS, min_p=0.4)) == [0, 1]  # keeps p >= 0.2 = 0.4 * 0.5
    assert list(candidates(LOGITS, top_k=0, top_p=1.0, min_p=0.0)) == [0, 1, 2, 3, 4]


def test_sampling_frequencies_follow_the_distribution():
    rng = np.random.default_rng(1)
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    draws = np.bincount([sample(LOGITS, p, rng) for _ in range(4000)], minlength=5) / 4000
    assert np.abs(draws - np.exp(LOGITS)).max() < 0.03


def test_temperature_sharpens():
    rng = np.random.default_rng(2)
    cold = SamplingParams(temperature=0.1, top_k=0, top_p=1.0, min_p=0.0)
    assert np.mean([sample(LOGITS, cold, rng) == 0 for _ in range(500)]) > 0.99


def test_seed_is_reproducible():
    p = SamplingParams(temperature=1.0, seed=5)
    a = [sample(LOGITS, p, np.random.default_rng(5)) for _ in range(20)]
    b = [sample(LOGITS, p, np.random.default_rng(5)) for _ in range(20)]
    assert a == b


def test_repeat_penalty():
    logits = np.array([2.0, -1.0, 1.0], np.float32)
    out = apply_repeat_penalty(logits, [0, 1], 2.0)
    assert list(out) == [1.0, -2.0, 1.0]
    greedy = SamplingParams(temperature=0.0, repeat_penalty=4.0)
    assert sample(logits, greedy, np.random.default_rng(0), recent=[0]) == 2


@pytest.mark.parametrize("bad", [dict(top_p=0.0), dict(min_p=1.0), dict(top_k=-1), dict(temperature=-1.0),
                                 dict(repeat_penalty=0.0)])
def test_invalid_parameters(bad):
    with pytest.raises(SparserunError):
        SamplingParams(**bad).validate()
