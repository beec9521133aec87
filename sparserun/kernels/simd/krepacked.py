"""Dots of the K-quants in the layout the loader repacks them into (kernels/krepack.py: Q4_KR, Q5_KR, Q6_KR, Q3_KR,
Q2_KR): each
super-block's quants laid across the vector lanes as repacked Q4_0's groups are (legacy._q4_0r_group_sums), so
the 8 sub-blocks' exact integer dots come out of the vpdpbusd chains as the 8 lanes of one vector, with no
horizontal reduction and no per-sub-block float work: Q4_K / Q5_K's sub-block scales and mins are converted to
floats once per super-block, shared by the tokens, and multiply the lanes exactly (Q6_K's 16 scales multiply its
lanes as integers); one FMA per term, super-block and token applies d (dmin) times the activations' block
scales. The activations come in quantize_acts' transposed form xt with the block offset terms xs (-8 times each
32 values' sum), rounded per 32 values or per 256 (Q8_K: quant.quantize_acts_k); both give llama.cpp's integers
where the rounding is theirs. One token or TOKENS_K tokens through one frame, on the VNNI route or the generic one.
"""
from llvmlite import ir
from numba.core import cgutils

from .iquants import _level_lanes
from .kquants import q3_k_scales
from .ir import TOKENS_K, _dots, _fma, _half_splat, _hsum8, _i32, _routes, _signed, _splat, _vload

_V8I = ir.VectorType(_i32, 8)
_V8F = ir.VectorType(ir.FloatType(), 8)
_I64 = ir.IntType(64)


def _c(v):
    return ir.Constant(_I64, v)


def _half(builder, p, at):
    """The fp16 at p + at as an <8 x float> splat (ir._half_splat: a scalar half load became vpinsrw into the
    accumulator's register, chaining every super-block to the one before)."""
    return _half_splat(builder, builder.gep(p, [_c(at)]))


def _chunks(builder, p, at):
    """The 4 lane-ordered chunks of 32 quant bytes at p + at as (low nibbles, high nibbles) <8 x i32> pairs:
    chunk j's byte 4 k + m holds sub-block k's values 8 j + m (low) and 8 j + 4 + m (high)."""
    out = []
    for j in range(4):
        v = _vload(builder, builder.gep(p, [_c(at + 32 * j)]), 32)
        out.append((builder.bitcast(builder.and_(v, _splat(32, 15)), _V8I),
                    builder.bitcast(builder.lshr(v, _splat(32, 4)), _V8I)))
    return out


def _k4_scale_bytes(builder, p):
    """Q4_K / Q5_K's 12 bytes of 6-bit scales and mins at p + 4 as <16 x i8>: the 8 scales, then the 8 mins (ggml's
    get_scale_min_k4), in vector registers: the three words w0, w1, w2 (and 4 bytes of the quants after them, unused)
    in one load, then [w0, w2, w1, w2 >> 4] masked to 6 and 4 bits, and the top 2 bits of w0's and w1's bytes
    moved to bits 4-5 of the second and fourth words (6 vector instructions; the scalar words took about 20)."""
    v4 = ir.VectorType(_i32, 4)
    w = builder.load(builder.bitcast(builder.gep(p, [_c(4)]), v4.as_pointer()), align=1)  # w0, w1, w2, (quants)
    k4 = lambda *vs: ir.Constant(v4, list(vs))  # noqa: E731
    low = builder.and_(builder.lshr(builder.shuffle_vector(w, w, k4(0, 2, 1, 2)), k4(0, 0, 0, 4)),
                       k4(0x3F3F3F3F, 0x0F0F0F0F, 0x3F3F3F3F, 0x0F0F0F0F))
    top = builder.and_(builder.lshr(builder.shuffle_vector(w, w, k4(0, 0, 1, 1)), k4(2, 2, 2, 2)),
                       k4(0, 0x30303030, 0, 0x30303030))  # bits 6-7 of each byte of w0 (w1) at bits 4-5
    return builder.bitcast(builder.or_(low, top), ir.VectorType(ir.IntType(8), 16))


def _q45_kr_super_block(builder, p, toks, dp, five):
    """Q4_KR super-block at p (144 bytes as Q4_K: d, dmin, the 12 bytes of 6-bit scales and mins, then the 128
    quant bytes in _chunks' order), or Q5_KR (five: 176 bytes, the same, then 32 bytes of fifth bits: bit 2 j of
    byte L that of chunk j's low nibble at L, bit 2 j + 1 its high one's): per token [(sc_k sums_k, d), (m_k xs_k, dmin /
    8)] (float lanes, exact), whose sum over lanes, times the activations' block scales, is the super-block's dot
    (value = d sc_k q - dmin m_k; xs is -8 times each block's activation sum). The scales unpack as ggml's own
    (_k4_scale_bytes)."""
    b16 = _k4_scale_bytes(builder, p)
    pick = lambda at: builder.zext(builder.shuffle_vector(b16, b16, ir.Constant(_V8I, list(range(at, at + 8)))), _V8I)  # noqa: E731
    sc, mn = pick(0), pick(8)
    d, dmin = _half(builder, p, 0), builder.fmul(_half(builder, p, 2), ir.Constant(_V8F, [0.125] * 8))
    if five:  # 5-bit values, each nibble joined by its fifth bit moved to bit 4
        fifth = _vload(builder, builder.gep(p, [_c(144)]), 32)

        def bit4(b):
            moved = builder.shl(fifth, _splat(32, 4 - b)) if b < 4 else builder.lshr(fifth, _splat(32, b - 4))
            return builder.and_(moved, _splat(32, 16))
        nibs = []
        for j in range(4):
            c = _vload(builder, builder.gep(p, [_c(16 + 32 * j)]), 32)
            nibs.append((builder.bitcast(builder.or_(builder.and_(c, _splat(32, 15)), bit4(2 * j)), _V8I),
                         builder.bitcast(builder.or_(builder.lshr(c, _splat(32, 4)), bit4(2 * j + 1)), _V8I)))
    else:
        nibs = _chunks(builder, p, 16)
    # the scales and mins as floats once per super-block, shared by the tokens: a lane's sums times them is exact
    # (|sums sc_k| and |xs m_k| stay below 2^24), the integers llama.cpp's dot multiplies by d and dmin
    scf, mnf = builder.sitofp(sc, _V8F), builder.sitofp(mn, _V8F)
    out = []
    for xv, xs, _, xsf in toks:
        sums = _dots(builder, dp, [t for j, (nl, nh) in enumerate(nibs) for t in ((nl, xv[2 * j]), (nh, xv[2 * j + 1]))],
                     qmax=31 if five else 15)
        xsf = builder.sitofp(xs, _V8F) if xsf is None else xsf
        out.append([(builder.fmul(builder.sitofp(sums, _V8F), scf), d), (builder.fmul(xsf, mnf), dmin)])
    return out


def _q4_kr_super_block(builder, p, toks, dp):
    return _q45_kr_super_block(builder, p, toks, dp, False)


def _q5_kr_super_block(builder, p, toks, dp):
    return _q45_kr_super_block(builder, p, toks, dp, True)


def _q6_kr_super_block(builder, p, toks, dp):
    """Q6_KR super-block at p (210 bytes: d, 16 int8 scales, 128 bytes of low 4 bits in _chunks' order, then 2 x 32
    bytes of high 2 bits: bits 2 s of byte 4 k + m of the h-th 32 are those of sub-block k's value 4 (4 h + s) + m):
    per token [(half sums x their scales, d)] (float lanes, exact). Value = d sc (q - 32), the scale per 16 values: lanes sum the first
    and second 16 of each sub-block apart (value runs i = 0-3 and 4-7), and the -32 comes from the first halves'
    activation sums (a vpdpbusd of 32s, or the activations' own xh, quant.quantize_acts_k) and xs (the
    whole block's), on every route."""
    d = _half(builder, p, 0)
    sc = builder.sext(_vload(builder, builder.gep(p, [_c(2)]), 16), ir.VectorType(_i32, 16))
    sc_a = builder.shuffle_vector(sc, sc, ir.Constant(_V8I, list(range(0, 16, 2))))
    sc_b = builder.shuffle_vector(sc, sc, ir.Constant(_V8I, list(range(1, 16, 2))))
    low = [_vload(builder, builder.gep(p, [_c(18 + 32 * j)]), 32) for j in range(4)]
    high = [_vload(builder, builder.gep(p, [_c(146 + 32 * h)]), 32) for h in range(2)]
    vals = []
    for i in range(8):
        c = low[i // 2]
        nib = builder.and_(c, _splat(32, 15)) if i % 2 == 0 else builder.and_(builder.lshr(c, _splat(32, 4)), _splat(32, 15))
        s, hb = i % 4, high[i // 4]
        top = (builder.shl(hb, _splat(32, 4 - 2 * s)) if s < 2 else
               builder.lshr(hb, _splat(32, 2 * s - 4)) if s > 2 else hb)
        vals.append(builder.bitcast(builder.or_(nib, builder.and_(top, _splat(32, 48))), _V8I))
    out = []
    for xv, xs, xh, _ in toks:
        first = _first_halves(builder, dp, xv, xh, 32)  # 32 x the first 16 values' sums
        sums_a = builder.sub(_dots(builder, dp, [(vals[i], xv[i]) for i in range(4)], qmax=63), first)
        # second halves: q x - 32 (whole sum - first) = q x + 4 xs + first (xs = -8 x the whole block's sum)
        sums_b = _dots(builder, dp, [(vals[4 + i], xv[4 + i]) for i in range(4)],
                       builder.add(builder.shl(xs, ir.Constant(_V8I, [2] * 8)), first), qmax=63)
        out.append([(builder.sitofp(builder.add(builder.mul(sums_a, sc_a), builder.mul(sums_b, sc_b)), _V8F), d)])
    return out


def _two_bit_values(builder, p, at):
    """The 8 value runs of Q3_KR / Q2_KR's two runs of 2-bit values at p + at, as <32 x i8>: run i's byte 4 k + m is
    sub-block k's value 4 i + m's 2 bits."""
    runs = [_vload(builder, builder.gep(p, [_c(at + 32 * c)]), 32) for c in range(2)]
    return [builder.and_(builder.lshr(runs[i // 4], _splat(32, 2 * (i % 4))) if i % 4 else runs[i // 4], _splat(32, 3))
            for i in range(8)]


def _even_odd(builder, b16):
    """Bytes 0, 2, .. 14 and 1, 3, .. 15 of a <16 x i8> as two <8 x i32> (zero-extended)."""
    return [builder.zext(builder.shuffle_vector(b16, b16, ir.Constant(_V8I, list(range(h, 16, 2)))), _V8I)
            for h in range(2)]


def _first_halves(builder, dp, xv, xh, weight):
    """weight x each block's first 16 activations' sum (<8 x i32>): from the Q8_K forms' xh (-8 x that sum) where
    the forms carry it, else a dot of the first 4 value runs' activations with weight."""
    if xh is not None and weight % 8 == 0:
        return builder.mul(xh, ir.Constant(_V8I, [-weight // 8] * 8))
    if xh is not None:
        return builder.ashr(builder.mul(xh, ir.Constant(_V8I, [-weight] * 8)), ir.Constant(_V8I, [3] * 8))  # exact
    return _dots(builder, dp, [(builder.bitcast(_splat(32, weight), _V8I), xv[i]) for i in range(4)], qmax=weight)


def _q3_kr_super_block(builder, p, toks, dp):
    """Q3_KR super-block at p (110 bytes: d, Q3_K's 12 bytes of 6-bit scales, 2 x 32 bytes of low 2 bits, 32 bytes of
    third bits; krepack.py): per token [(half sums x their scales, d)] (float lanes, exact). Value = d (sc - 32) (q -
    4), a scale per 16 values: lanes sum each sub-block's first and second 16 apart (value runs 0-3 and 4-7), and the
    - 4 comes from the first halves' activation sums and xs (the whole block's), as Q6_KR's - 32. The scales unpack as
    ggml's own (kquants.q3_k_scales)."""
    d = _half(builder, p, 0)
    thirty2 = ir.Constant(_V8I, [32] * 8)
    sc_a, sc_b = [builder.sub(v, thirty2) for v in _even_odd(builder, q3_k_scales(builder, builder.gep(p, [_c(2)])))]
    third = _vload(builder, builder.gep(p, [_c(78)]), 32)
    vals = []
    for i, low in enumerate(_two_bit_values(builder, p, 14)):  # the third bit moved to bit 2
        top = builder.shl(third, _splat(32, 2 - i)) if i < 2 else builder.lshr(third, _splat(32, i - 2)) if i > 2 else third
        vals.append(builder.bitcast(builder.or_(low, builder.and_(top, _splat(32, 4))), _V8I))
    out = []
    for xv, xs, xh, _ in toks:
        first = _first_halves(builder, dp, xv, xh, 4)
        sums_a = builder.sub(_dots(builder, dp, [(vals[i], xv[i]) for i in range(4)], qmax=7), first)
        # second halves: q x - 4 (whole sum - first) = q x + xs / 2 + first (xs = -8 x the whole block's sum)
        sums_b = _dots(builder, dp, [(vals[4 + i], xv[4 + i]) for i in range(4)],
                       builder.add(builder.ashr(xs, ir.Constant(_V8I, [1] * 8)), first), qmax=7)
        out.append([(builder.sitofp(builder.add(builder.mul(sums_a, sc_a), builder.mul(sums_b, sc_b)), _V8F), d)])
    return out


def _q2_kr_super_block(builder, p, toks, dp):
    """Q2_KR super-block at p (84 bytes: d, dmin, Q2_K's 16 scale bytes, 2 x 32 bytes of 2-bit values; krepack.py):
    per token [(half sums x their scales, d), (the mins x their halves' -8 x activation sums, dmin / 8)] (float lanes,
    exact). Value = d sc q - dmin m, a scale and min per 16 values (a byte: low and high nibble)."""
    d, dmin = _half(builder, p, 0), builder.fmul(_half(builder, p, 2), ir.Constant(_V8F, [0.125] * 8))
    b_a, b_b = _even_odd(builder, _vload(builder, builder.gep(p, [_c(4)]), 16))
    fifteen, four = ir.Constant(_V8I, [15] * 8), ir.Constant(_V8I, [4] * 8)
    sc_a, sc_b, mn_a, mn_b = builder.and_(b_a, fifteen), builder.and_(b_b, fifteen), builder.lshr(b_a, four), builder.lshr(b_b, four)
    vals = [builder.bitcast(v, _V8I) for v in _two_bit_values(builder, p, 20)]
    out = []
    for xv, xs, xh, _ in toks:
        sums = [_dots(builder, dp, [(vals[4 * h + i], xv[4 * h + i]) for i in range(4)], qmax=3) for h in range(2)]
        first = xh if xh is not None else builder.mul(_first_halves(builder, dp, xv, None, 1), ir.Constant(_V8I, [-8] * 8))
        mins = builder.add(builder.mul(first, mn_a), builder.mul(builder.sub(xs, first), mn_b))
        out.append([(builder.sitofp(builder.add(builder.mul(sums[0], sc_a), builder.mul(sums[1], sc_b)), _V8F), d),
                    (builder.sitofp(mins, _V8F), dmin)])
    return out


def _iq4_xsr_super_block(builder, p, toks, dp):
    """IQ4_XSR super-block at p (136 bytes: d, IQ4_XS's 2 bytes of the scales' high bits and 4 of their low ones, the
    nibbles in _chunks' order; krepack.py): per token [(sums x the 8 scales, d)] (float lanes, exact: |sums| <= 32 x
    127 x 128 and |scale| <= 32). Value = d (ls_k - 32) levels[q]: each nibble looked up (iquants._levels: vpshufb on
    x86), then as the other offset-128 types: levels + 128 for vpdpbusd, each lane seeded with -128 x its block's
    activation sum (16 xs), or on AVX2's signed dot (ir._dpbssd_avx2) the levels themselves and no seed."""
    d = _half(builder, p, 0)
    k32 = lambda v: ir.Constant(_V8I, [v] * 8)  # noqa: E731

    def lanes(at, ty, step):  # the little-endian word at p + at in every lane, lane k shifted right by step k
        v = builder.zext(builder.load(builder.bitcast(builder.gep(p, [_c(at)]), ty.as_pointer()), align=1), _i32)
        v = builder.insert_element(ir.Constant(_V8I, None), v, ir.Constant(_i32, 0))
        return builder.lshr(builder.shuffle_vector(v, v, ir.Constant(_V8I, [0] * 8)), ir.Constant(_V8I, [step * k for k in range(8)]))
    low, high = builder.and_(lanes(4, _i32, 4), k32(15)), builder.and_(lanes(2, ir.IntType(16), 2), k32(3))
    sc = builder.sub(builder.or_(low, builder.shl(high, k32(4))), k32(32))
    vals = [_level_lanes(builder, nib, dp) for pair in _chunks(builder, p, 8) for nib in pair]
    out = []
    for xv, xs, _, _ in toks:
        sums = _dots(builder, dp, list(zip(vals, xv)), None if _signed(dp) else builder.shl(xs, k32(4)), qmax=255)
        out.append([(builder.sitofp(builder.mul(sums, sc), _V8F), d)])
    return out


def _kr_token_dots(size, super_block, q8k=False):
    """The token_dots frame (ir._row_intrinsic / _tokens_intrinsic) of a repacked K-quant: per super-block (8 blocks
    of 32), each token's 8 transposed activation vectors, offset terms and 8 block scales loaded once, the row's
    terms (lanes, scale) from super_block(builder, p, [(xv, xs, xh, xsf) per token], dp) accumulated by FMA with
    scale x the block scales, one accumulator per term (the rounding of llama.cpp's dots, which scale an exact
    integer by d x the activations' scale); one horizontal sum per token at the end. The one-token and several-token forms give identical results. The
    offset terms: q8k (per_block = 3), quant.quantize_acts_k's xs, 24 a super-block at three times its first
    block's index: the 8 blocks' (int32), xh, their first 16 values' (int32), and xsf, the blocks' as float32 (one
    conversion fewer per token in the Q4_K / Q5_K dots); else (per_block = 2) one a block (quant.quantize_acts',
    the neuron packs', one token at offset 0), no xh, and xsf converted here."""
    def token_dots(builder, wp, nb, xps, xdps, xsps, dp):
        nb = builder.sext(nb, _I64) if nb.type.width < 64 else nb
        accs = [[cgutils.alloca_once_value(builder, ir.Constant(_V8F, [0.0] * 8)) for _ in range(2)] for _ in xps]
        with cgutils.for_range(builder, builder.udiv(nb, _c(8))) as loop:
            s = loop.index
            b0 = builder.mul(s, _c(8))
            toks, xd8s = [], []
            for xp, xdp, xsp in zip(xps, xdps, xsps):
                xg = builder.gep(xp, [builder.mul(b0, _c(32))])
                xv = [builder.load(builder.bitcast(builder.gep(xg, [_c(32 * i)]), _V8I.as_pointer()), align=1)
                      for i in range(8)]
                at = builder.mul(b0, _c(3)) if q8k else b0
                xs = builder.load(builder.bitcast(builder.gep(xsp, [at]), _V8I.as_pointer()), align=4)
                xh, xsf = (builder.load(builder.bitcast(builder.gep(xsp, [builder.add(at, _c(k))]), ty.as_pointer()),
                                        align=4) if q8k else None for k, ty in ((8, _V8I), (16, _V8F)))
                toks.append((xv, xs, xh, xsf))
                xd8s.append(builder.load(builder.bitcast(builder.gep(xdp, [b0]), _V8F.as_pointer()), align=4))
            terms = super_block(builder, builder.gep(wp, [builder.mul(s, _c(size))]), toks, dp)
            for tok_terms, xd8, acc in zip(terms, xd8s, accs):
                for k, (lanes, scale) in enumerate(tok_terms):
                    builder.store(_fma(builder, lanes, builder.fmul(scale, xd8), builder.load(acc[k])),
                                  acc[k])
        return [_hsum8(builder, builder.fadd(builder.load(a[0]), builder.load(a[1]))) for a in accs]

    return token_dots


# the neuron packs' (activations rounded per 32 values: quant.quantize_acts)
dot_row_q4_kr_vnni, _, dot_row_q4_kr_generic, _ = _routes(
    _kr_token_dots(144, _q4_kr_super_block), "Q4_KR", per_block=2, tokens=TOKENS_K)
dot_row_q5_kr_vnni, _, dot_row_q5_kr_generic, _ = _routes(
    _kr_token_dots(176, _q5_kr_super_block), "Q5_KR", per_block=2, tokens=TOKENS_K)
dot_row_q6_kr_vnni, _, dot_row_q6_kr_generic, _ = _routes(
    _kr_token_dots(210, _q6_kr_super_block), "Q6_KR", per_block=2, tokens=TOKENS_K)
dot_row_q3_kr_vnni, _, dot_row_q3_kr_generic, _ = _routes(
    _kr_token_dots(110, _q3_kr_super_block), "Q3_KR", per_block=2, tokens=TOKENS_K)
dot_row_q2_kr_vnni, _, dot_row_q2_kr_generic, _ = _routes(
    _kr_token_dots(84, _q2_kr_super_block), "Q2_KR", per_block=2, tokens=TOKENS_K)
dot_row_iq4_xsr_vnni, _, dot_row_iq4_xsr_generic, _ = _routes(
    _kr_token_dots(136, _iq4_xsr_super_block), "IQ4_XSR", per_block=2, tokens=TOKENS_K, signed=True)
# the dense matmuls' (rounded as Q8_K: quant.quantize_acts_k), Q6_K's reading the first 16 values' sums from the
# forms, 4 vpdpbusd fewer per 8 on the VNNI route
dot_row_q4_krk_vnni, dot_tokens_q4_krk_vnni, dot_row_q4_krk_generic, dot_tokens_q4_krk_generic = _routes(
    _kr_token_dots(144, _q4_kr_super_block, True), "Q4_KR", per_block=3, tokens=TOKENS_K)
dot_row_q5_krk_vnni, dot_tokens_q5_krk_vnni, dot_row_q5_krk_generic, dot_tokens_q5_krk_generic = _routes(
    _kr_token_dots(176, _q5_kr_super_block, True), "Q5_KR", per_block=3, tokens=TOKENS_K)
dot_row_q6_krk_vnni, dot_tokens_q6_krk_vnni, dot_row_q6_krk_generic, dot_tokens_q6_krk_generic = _routes(
    _kr_token_dots(210, _q6_kr_super_block, True), "Q6_KR", per_block=3, tokens=TOKENS_K)
dot_row_q3_krk_vnni, dot_tokens_q3_krk_vnni, dot_row_q3_krk_generic, dot_tokens_q3_krk_generic = _routes(
    _kr_token_dots(110, _q3_kr_super_block, True), "Q3_KR", per_block=3, tokens=TOKENS_K)
dot_row_q2_krk_vnni, dot_tokens_q2_krk_vnni, dot_row_q2_krk_generic, dot_tokens_q2_krk_generic = _routes(
    _kr_token_dots(84, _q2_kr_super_block, True), "Q2_KR", per_block=3, tokens=TOKENS_K)
dot_row_iq4_xsrk_vnni, dot_tokens_iq4_xsrk_vnni, dot_row_iq4_xsrk_generic, dot_tokens_iq4_xsrk_generic = _routes(
    _kr_token_dots(136, _iq4_xsr_super_block, True), "IQ4_XSR", per_block=3, tokens=TOKENS_K, signed=True)
