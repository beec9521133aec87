"""The fallback and low-bit types (Q4_1, Q5_0, Q5_1, IQ4_NL, IQ4_XS, Q2_K, Q3_K): dequantized bit for bit as
gguf-py's reference (gguf.quants.dequantize), on blocks of random bytes with sane fp16 scales, and Q5_0's int8 dot
against its dequantized row."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T, quants

from sparserun.gguf_file import RawTensor
from sparserun.kernels import quant as K
from sparserun.qtypes import TYPES
from sparserun.weights import Acts, Weight

# byte offsets of each block's fp16 scales (kept finite: random bits would make NaN and inf)
SCALES = {T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.IQ4_NL: (0,), T.IQ4_XS: (0,), T.Q2_K: (80, 82),
          T.Q3_K: (108,)}


def random_blocks(qtype, rows, cols, rng):
    block, bb = TYPES[int(qtype)].block, TYPES[int(qtype)].block_bytes
    nb = rows * cols // block
    raw = rng.integers(0, 256, (nb, bb), dtype=np.uint8)
    for off in SCALES[qtype]:
        raw[:, off:off + 2] = (rng.standard_normal(nb) * 0.05).astype(np.float16).view(np.uint8).reshape(nb, 2)
    return raw.reshape(-1)


@pytest.mark.parametrize("qtype", list(SCALES), ids=lambda t: t.name)
def test_dequantize_bit_exact(qtype):
    rng = np.random.default_rng(int(qtype))
    rows, cols = 6, 512
    raw = random_blocks(qtype, rows, cols, rng)
    ref = quants.dequantize(raw.reshape(rows, -1), qtype).astype(np.float32)
    w = Weight(RawTensor("w", int(qtype), rows, cols, raw, raw.nbytes // rows))
    got = w.dequantize()
    assert got.shape == ref.shape and np.array_equal(got.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qtype", list(SCALES), ids=lambda t: t.name)
def test_matmul_matches_dequantized(qtype):
    """Every type's matmul (the int8 dots for Q5_0, Q4_1 and Q5_1, the dequantizing one for the rest) against float64
    products of the dequantized rows; the int8 dots' error is the int8 rounding of the activations (as llama.cpp's
    q8_0 / q8_1 dots)."""
    rng = np.random.default_rng(7)
    rows, cols = 40, 768 if TYPES[int(qtype)].block == 256 else 320
    raw = random_blocks(qtype, rows, cols, rng)
    w = Weight(RawTensor("w", int(qtype), rows, cols, raw, raw.nbytes // rows))
    x = rng.standard_normal((3, cols)).astype(np.float32)
    ref = x.astype(np.float64) @ w.dequantize().astype(np.float64).T
    got = w.matmul(Acts(x))
    tol = 0.02 if int(qtype) in K.INT8_MATMUL or int(qtype) in K.X8_MATMUL else 1e-4
    assert np.abs(got - ref).max() <= tol * np.abs(ref).max()
