"""VNNI dots of the K-quants (Q4_K, Q5_K, Q6_K: 256-value super-blocks with 6-bit or 8-bit sub-block scales): exact
integer sums per 32 values through vpdpbusd, each scaled by its sub-block's scale and the activations' block
scale; Q4_K / Q5_K's mins come from the activations' block sums. One token or TOKENS tokens through one frame.
"""
from llvmlite import ir
from numba.core import cgutils
from .ir import (_fma, _hsum8, _i32, _i8, _routes, _row_intrinsic, _signed, _splat, _splat_f, _tokens_intrinsic, _vload)

def _kquant_token_dots(builder, nb, xps, xdps, xbps, dp, super_block):
    """Shared frame of the K-quant VNNI dots, for one token or several (pointers per token, as
    _q4_0r_token_dots): super_block(s, block) emits super-block s (8 activation blocks), calling
    block(j, q, init, scale, min_scale) per 32-value block j: q <32 x i8> unsigned weights (built once for all
    tokens), init the vpdpbusd accumulator input from the token's xb lanes, scale the float to multiply the exact
    lane sums by (a scalar or an <8 x float>: lanes 0-3 hold values 0-15, lanes 4-7 values 16-31), min_scale a
    scalar or an <8 x float> times the lanes of xb (-8 x each lane's activation sum), or None. Per token two accumulators by block parity, one for the min terms, one horizontal
    sum: the one-token and several-token forms give identical results."""
    v8f, v8i, i64 = ir.VectorType(ir.FloatType(), 8), ir.VectorType(_i32, 8), ir.IntType(64)
    nb = builder.sext(nb, i64) if nb.type.width < 64 else nb
    c = lambda v: ir.Constant(i64, v)
    accs = [[cgutils.alloca_once_value(builder, ir.Constant(v8f, [0.0] * 8)) for _ in range(3)]  # even, odd, mins
            for _ in xps]
    with cgutils.for_range(builder, builder.udiv(nb, c(8))) as loop:
        s = loop.index

        def block(j, q, init, scale, min_scale):
            b = builder.add(builder.mul(s, c(8)), c(j))
            if _signed(dp):  # an offset-128 type (IQ4_XS) on AVX2's dot of signed bytes: w itself, no offset
                q, init = builder.xor(q, _splat(32, -128)), lambda xbv: ir.Constant(xbv.type, None)
            q = builder.bitcast(q, v8i)
            scale = scale if isinstance(scale.type, ir.VectorType) else _splat_f(builder, scale)
            for xp, xdp, xbp, acc in zip(xps, xdps, xbps, accs):
                xv = builder.load(builder.bitcast(builder.gep(xp, [builder.mul(b, c(32))]), v8i.as_pointer()), align=1)
                xbv = builder.load(builder.gep(xbp, [b]), align=4)
                lanes = builder.call(dp, [init(xbv), q, xv])
                xd = _splat_f(builder, builder.load(builder.gep(xdp, [b]), align=4))
                a = acc[j % 2]
                builder.store(_fma(builder, builder.sitofp(lanes, v8f), builder.fmul(scale, xd), builder.load(a)), a)
                if min_scale is not None:
                    ms = min_scale if isinstance(min_scale.type, ir.VectorType) else _splat_f(builder, min_scale)
                    builder.store(_fma(builder, builder.sitofp(xbv, v8f), builder.fmul(ms, xd), builder.load(acc[2])),
                                  acc[2])

        super_block(s, block)
    eighth = ir.Constant(ir.FloatType(), 0.125)
    return [builder.fadd(_hsum8(builder, builder.fadd(builder.load(a[0]), builder.load(a[1]))),
                         builder.fmul(_hsum8(builder, builder.load(a[2])), eighth)) for a in accs]


def _kquant_tokens(super_block_of):
    """_kquant_token_dots for one K-quant type, in the token_dots form _row_intrinsic and _tokens_intrinsic take."""
    return lambda builder, wp, nb, xps, xdps, xbps, dp: _kquant_token_dots(builder, nb, xps, xdps, xbps, dp,
                                                                           super_block_of(builder, wp, dp))


def _q45_k_super_block(builder, wp, dp, five):
    """Q4_K (144 bytes: fp16 d and dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles; sub-block j
    in the low (even j) or high (odd j) nibbles of bytes 32 (j // 2) on): value = d sc_j q - dmin m_j. Q5_K
    (five; 176 bytes) has 32 bytes qh before the nibbles: bit j of qh[l] is the 5th bit of sub-block j's value l."""
    i64, f32 = ir.IntType(64), ir.FloatType()
    c = lambda v: ir.Constant(i64, v)
    size, qs = (176, 48) if five else (144, 16)

    def emit(s, block):
        p = builder.gep(wp, [builder.mul(s, c(size))])
        qh = _vload(builder, builder.gep(p, [c(16)]), 32) if five else None
        half = lambda at: builder.fpext(builder.load(builder.bitcast(builder.gep(p, [c(at)]), ir.HalfType().as_pointer())), f32)
        d, dmin = half(0), half(2)
        S = [builder.zext(builder.load(builder.gep(p, [c(4 + k)])), _i32) for k in range(12)]
        k32 = lambda v: ir.Constant(_i32, v)
        for j in range(8):
            if j < 4:
                sc, m = builder.and_(S[j], k32(63)), builder.and_(S[j + 4], k32(63))
            else:
                sc = builder.or_(builder.and_(S[j + 4], k32(15)), builder.shl(builder.lshr(S[j - 4], k32(6)), k32(4)))
                m = builder.or_(builder.lshr(S[j + 4], k32(4)), builder.shl(builder.lshr(S[j], k32(6)), k32(4)))
            if j % 2 == 0:
                q = _vload(builder, builder.gep(p, [c(qs + 32 * (j // 2))]), 32)
            nib = builder.and_(q, _splat(32, 15)) if j % 2 == 0 else builder.lshr(q, _splat(32, 4))
            if five:  # bit j of qh, moved to bit 4
                bit = builder.and_(qh, _splat(32, 1 << j))
                nib = builder.or_(nib, builder.shl(bit, _splat(32, 4 - j)) if j < 4 else
                                  builder.lshr(bit, _splat(32, j - 4)))
            zero = lambda xbv: ir.Constant(xbv.type, None)
            block(j, nib, zero, builder.fmul(d, builder.sitofp(sc, f32)), builder.fmul(dmin, builder.sitofp(m, f32)))

    return emit


def _q4_k_super_block(builder, wp, dp):
    return _q45_k_super_block(builder, wp, dp, False)


def _q5_k_super_block(builder, wp, dp):
    return _q45_k_super_block(builder, wp, dp, True)


def _q23_scales(builder, values, scale):
    """<16 x float>: 16 scale bytes (<16 x i8>, as unsigned) times scale (a float)."""
    f32 = ir.FloatType()
    return builder.fmul(builder.uitofp(values, ir.VectorType(f32, 16)), _splat_f(builder, scale, 16))


def _halves(builder, v, j):
    """<8 x float>: lanes 0-3 the 16-value scale 2 j of v (<16 x float>), lanes 4-7 scale 2 j + 1."""
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, 8), [2 * j] * 4 + [2 * j + 1] * 4))


def _q2_k_super_block(builder, wp, dp):
    """Q2_K (84 bytes: 16 bytes of scales, a 4-bit scale and a 4-bit min per 16 values; 64 bytes of 2-bit quants;
    fp16 d and dmin): value = d (sc & 15) q - dmin (sc >> 4). 32-value block 4 n + j holds bits 2 j of bytes
    16 + 32 n on (ggml's dequantize_row_q2_K); its halves take scales 2 (4 n + j) and the next."""
    i64, f32 = ir.IntType(64), ir.FloatType()
    c = lambda v: ir.Constant(i64, v)  # noqa: E731

    def emit(s, block):
        p = builder.gep(wp, [builder.mul(s, c(84))])
        half = lambda at: builder.fpext(builder.load(builder.bitcast(builder.gep(p, [c(at)]), ir.HalfType().as_pointer()),  # noqa: E731
                                                     align=1), f32)
        sb = _vload(builder, p, 16)
        scales = _q23_scales(builder, builder.and_(sb, _splat(16, 15)), half(80))
        mins = _q23_scales(builder, builder.lshr(sb, _splat(16, 4)), half(82))
        zero = lambda xbv: ir.Constant(xbv.type, None)  # noqa: E731
        for n in range(2):
            q = _vload(builder, builder.gep(p, [c(16 + 32 * n)]), 32)
            for j in range(4):
                m = 4 * n + j
                block(m, builder.and_(builder.lshr(q, _splat(32, 2 * j)), _splat(32, 3)), zero,
                      _halves(builder, scales, m), _halves(builder, mins, m))

    return emit


def q3_k_scales(builder, p):
    """Q3_K's 16 6-bit scales from the 12 bytes at p as <16 x i8> (0..63, before the - 32): ggml's own unpacking
    (dequantize_row_q3_K: three 32-bit words, masks and shifts). Q3_KR keeps the same 12 bytes."""
    k32 = lambda v: ir.Constant(_i32, v)  # noqa: E731
    aux = [builder.load(builder.bitcast(builder.gep(p, [ir.Constant(ir.IntType(64), 4 * k)]), _i32.as_pointer()),
                        align=1) for k in range(3)]
    m1, m2 = k32(0x03030303), k32(0x0F0F0F0F)
    low = lambda v, sh: builder.and_(builder.lshr(v, k32(sh)), m2) if sh else builder.and_(v, m2)  # noqa: E731
    top = lambda sh: builder.shl(builder.and_(builder.lshr(aux[2], k32(sh)), m1), k32(4))  # noqa: E731
    words = [builder.or_(low(aux[0], 0), top(0)), builder.or_(low(aux[1], 0), top(2)),
             builder.or_(low(aux[0], 4), top(4)), builder.or_(low(aux[1], 4), top(6))]
    v4 = ir.Constant(ir.VectorType(_i32, 4), None)
    for k, w in enumerate(words):
        v4 = builder.insert_element(v4, w, k32(k))
    return builder.bitcast(v4, ir.VectorType(_i8, 16))


def _q3_k_super_block(builder, wp, dp):
    """Q3_K (110 bytes: 32 bytes hmask, 64 bytes of 2-bit quants, 12 bytes holding 16 6-bit scales, fp16 d): value
    = d (sc - 32) (u - 4), u the 2 low bits (bits 2 j of bytes 32 + 32 n on, for 32-value block 4 n + j) and bit
    4 n + j of hmask as the third (ggml's dequantize_row_q3_K, whose scale unpacking this repeats). The -4 goes into
    the accumulator input (xb / 2 = -4 x each lane's activation sum)."""
    i64, f32 = ir.IntType(64), ir.FloatType()
    c = lambda v: ir.Constant(i64, v)  # noqa: E731

    def emit(s, block):
        p = builder.gep(wp, [builder.mul(s, c(110))])
        d = builder.fpext(builder.load(builder.bitcast(builder.gep(p, [c(108)]), ir.HalfType().as_pointer()), align=1),
                          f32)
        sc = builder.sub(builder.zext(q3_k_scales(builder, builder.gep(p, [c(96)])), ir.VectorType(_i32, 16)),
                         ir.Constant(ir.VectorType(_i32, 16), [32] * 16))
        scales = builder.fmul(builder.sitofp(sc, ir.VectorType(f32, 16)), _splat_f(builder, d, 16))
        hm = _vload(builder, p, 32)
        init = lambda xbv: builder.ashr(xbv, _splat(8, 1, _i32))  # noqa: E731
        for n in range(2):
            q = _vload(builder, builder.gep(p, [c(32 + 32 * n)]), 32)
            for j in range(4):
                m = 4 * n + j
                u = builder.or_(builder.and_(builder.lshr(q, _splat(32, 2 * j)), _splat(32, 3)),
                                builder.shl(builder.and_(builder.lshr(hm, _splat(32, m)), _splat(32, 1)), _splat(32, 2)))
                block(m, u, init, _halves(builder, scales, m), None)

    return emit


def _q6_k_super_block(builder, wp, dp):
    """Q6_K (210 bytes: 128 bytes ql, 64 bytes qh, 16 int8 scales, fp16 d; see quant._dequant_q6_k for where each
    value's bits lie): value = d sc_(v // 16) (q - 32). The -32 goes into the accumulator input (4 xb = -32 x each
    lane's activation sum); a block's lanes 0-3 take one scale and 4-7 the next."""
    i64, f32 = ir.IntType(64), ir.FloatType()
    c = lambda v: ir.Constant(i64, v)

    def emit(s, block):
        p = builder.gep(wp, [builder.mul(s, c(210))])
        d = builder.fpext(builder.load(builder.bitcast(builder.gep(p, [c(208)]), ir.HalfType().as_pointer())), f32)
        scales = builder.fmul(builder.sitofp(_vload(builder, builder.gep(p, [c(192)]), 16), ir.VectorType(f32, 16)),
                              _splat_f(builder, d, 16))
        init = lambda xbv: builder.shl(xbv, _splat(8, 2, _i32))
        for h in range(2):
            a = _vload(builder, builder.gep(p, [c(64 * h)]), 32)
            cc = _vload(builder, builder.gep(p, [c(64 * h + 32)]), 32)
            e = _vload(builder, builder.gep(p, [c(128 + 32 * h)]), 32)
            lo4, hi4 = lambda v: builder.and_(v, _splat(32, 15)), lambda v: builder.lshr(v, _splat(32, 4))
            qs = [builder.or_(lo4(a), builder.shl(builder.and_(e, _splat(32, 3)), _splat(32, 4))),
                  builder.or_(lo4(cc), builder.shl(builder.and_(e, _splat(32, 12)), _splat(32, 2))),
                  builder.or_(hi4(a), builder.and_(e, _splat(32, 48))),
                  builder.or_(hi4(cc), builder.lshr(builder.and_(e, _splat(32, 192)), _splat(32, 2)))]
            for k in range(4):
                m = 4 * h + k
                sc = builder.shuffle_vector(scales, scales, ir.Constant(ir.VectorType(_i32, 8), [2 * m] * 4 + [2 * m + 1] * 4))
                block(m, qs[k], init, sc, None)

    return emit


dot_row_q4_k_vnni = _row_intrinsic(_kquant_tokens(_q4_k_super_block), """A Q4_K row's dot with one token's int8 activations through
    vpdpbusd (x86 AVX512-VNNI only): exact integer sums of nibbles times activations per 32-value sub-block, scaled
    by d sc_j and the activations' block scale; the mins' term from the activations' block sums (xb).""")
dot_row_q5_k_vnni = _row_intrinsic(_kquant_tokens(_q5_k_super_block), """dot_row_q4_k_vnni for Q5_K rows:
    each 32 values' nibbles take their 5th bit from qh before the vpdpbusd.""")
dot_row_q6_k_vnni = _row_intrinsic(_kquant_tokens(_q6_k_super_block), """A Q6_K row's dot with one token's int8 activations through
    vpdpbusd (x86 AVX512-VNNI only): the 6-bit values assembled from their low and high bits 32 at a time, exact
    integer sums per 32 values, each half of the lanes scaled by its 16 values' scale.""")


_KQ_TOKENS_DOC = """dot_row_{0}_vnni of one row with TOKENS tokens' activations (_tokens_intrinsic): each block's weights
    assembled once for all of them; each result identical to the one-token dot."""
dot_tokens_q4_k_vnni = _tokens_intrinsic(_kquant_tokens(_q4_k_super_block), _KQ_TOKENS_DOC.format("q4_k"))
dot_tokens_q5_k_vnni = _tokens_intrinsic(_kquant_tokens(_q5_k_super_block), _KQ_TOKENS_DOC.format("q5_k"))
dot_tokens_q6_k_vnni = _tokens_intrinsic(_kquant_tokens(_q6_k_super_block), _KQ_TOKENS_DOC.format("q6_k"))


# The same dots for CPUs without AVX512-VNNI (AVX2 laptops, ARM): vpdpbusd's arithmetic in generic vector IR
# (ir._dpbusd_generic), identical results; the K-quant rows are dotted in integers there too instead of being
# dequantized to floats.
dot_row_q4_k_generic = _row_intrinsic(_kquant_tokens(_q4_k_super_block), "dot_row_q4_k_vnni in generic IR.", True)
dot_row_q5_k_generic = _row_intrinsic(_kquant_tokens(_q5_k_super_block), "dot_row_q5_k_vnni in generic IR.", True)
dot_row_q6_k_generic = _row_intrinsic(_kquant_tokens(_q6_k_super_block), "dot_row_q6_k_vnni in generic IR.", True)
dot_tokens_q4_k_generic = _tokens_intrinsic(_kquant_tokens(_q4_k_super_block), "dot_tokens_q4_k_vnni in generic IR.",
                                            generic=True)
dot_tokens_q5_k_generic = _tokens_intrinsic(_kquant_tokens(_q5_k_super_block), "dot_tokens_q5_k_vnni in generic IR.",
                                            generic=True)
dot_tokens_q6_k_generic = _tokens_intrinsic(_kquant_tokens(_q6_k_super_block), "dot_tokens_q6_k_vnni in generic IR.",
                                            generic=True)

# Q2_K and Q3_K, VNNI and generic (the frames above)
dot_row_q2_k_vnni, dot_tokens_q2_k_vnni, dot_row_q2_k_generic, dot_tokens_q2_k_generic = _routes(
    _kquant_tokens(_q2_k_super_block), "Q2_K")
dot_row_q3_k_vnni, dot_tokens_q3_k_vnni, dot_row_q3_k_generic, dot_tokens_q3_k_generic = _routes(
    _kquant_tokens(_q3_k_super_block), "Q3_K")
