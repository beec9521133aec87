"""LLVM vector-IR intrinsics for the block dot products numba will not vectorize on its own.

numba's loops over quantized blocks (a scale per 32 weights, nibbles to split) stay scalar. These
intrinsics emit generic LLVM vector IR (so they also build for ARM): load a block's packed quants, widen
to int32 lanes, multiply with an int8-quantized activation block and reduce. On AVX2 LLVM lowers the
widen+multiply+pairwise-add pattern to vpmaddwd.

The x86 exceptions (dot_row_q4_0_vnni, axpy_q4_vnni) call AVX512-VNNI's vpdpbusd. Kernels compile them
into a branch taken only when HAS_X86_VNNI; on any other CPU their body is a trap, so the kernels still
compile there (an x86 intrinsic would not) and the branch is never taken.

All pointers are (array, byte offset) pairs: callers validate offsets before any kernel runs
(see sparserun.gguf_file), so these do no bounds checks of their own.
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_i8, _i16, _i32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)


def _has_x86_vnni():
    """AVX512-VNNI (with VL for 256-bit forms) on this CPU, unless SPARSERUN_NO_VNNI=1 (A/B runs, or a fallback)."""
    import os

    import llvmlite.binding as llvm

    if os.environ.get("SPARSERUN_NO_VNNI") == "1":
        return False
    try:
        f = llvm.get_host_cpu_features()
        return bool(f.get("avx512vnni") and f.get("avx512vl"))
    except Exception:
        return False


HAS_X86_VNNI = _has_x86_vnni()
Q4_0R_GROUP = 8  # blocks per group of the repacked Q4_0 row layout (quant.repack_q4_0)


def _vnni_or_trap(codegen):
    """codegen where HAS_X86_VNNI, else a body that traps (callers only reach it when HAS_X86_VNNI)."""
    if HAS_X86_VNNI:
        return codegen

    def trap(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.trap")
        builder.call(fn, [])
        return context.get_constant_null(signature.return_type) if signature.return_type != types.void \
            else context.get_dummy_value()

    return trap


def _ptr(context, builder, arrty, arr, off):
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.gep(builder.bitcast(data, _i8.as_pointer()), [off])


def _vload(builder, ptr, n):
    vty = ir.VectorType(_i8, n)
    return builder.load(builder.bitcast(ptr, vty.as_pointer()), align=1)


def _splat(n, value, ty=_i8):
    return ir.Constant(ir.VectorType(ty, n), [value] * n)


@intrinsic
def load_f16(typingctx, arr, off):
    """float32 value of the IEEE half stored at arr's byte offset `off`."""
    sig = types.float32(arr, off)

    def codegen(context, builder, signature, args):
        p = _ptr(context, builder, signature.args[0], args[0], args[1])
        h = builder.load(builder.bitcast(p, ir.HalfType().as_pointer()), align=1)
        return builder.fpext(h, ir.FloatType())

    return sig, codegen


@intrinsic
def load_bf16(typingctx, arr, off):
    """float32 value of the bfloat16 stored at arr's byte offset `off` (its upper 16 bits)."""
    sig = types.float32(arr, off)

    def codegen(context, builder, signature, args):
        p = _ptr(context, builder, signature.args[0], args[0], args[1])
        h = builder.load(builder.bitcast(p, _i16.as_pointer()), align=1)
        bits = builder.shl(builder.zext(h, _i32), ir.Constant(_i32, 16))
        return builder.bitcast(bits, ir.FloatType())

    return sig, codegen


@intrinsic
def f32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the int32 `bits` (builds 2**n for ops.fast_exp; vectorizes)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def round_f16(typingctx, value):
    """value rounded to the nearest IEEE half, as float32 (llama.cpp stores block scales as fp16)."""
    sig = types.float32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def half_bits(typingctx, value):
    """The IEEE half nearest to float32 value (round to nearest even, as numpy's astype(float16)), as its uint16
    bits."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), _i16)

    return sig, codegen


@intrinsic
def load_f32(typingctx, arr, off):
    """float32 value stored at arr's byte offset `off` (no alignment assumed)."""
    sig = types.float32(arr, off)

    def codegen(context, builder, signature, args):
        p = _ptr(context, builder, signature.args[0], args[0], args[1])
        return builder.load(builder.bitcast(p, ir.FloatType().as_pointer()), align=1)

    return sig, codegen


def _even_odd_add(builder, v):
    """Sum adjacent lane pairs of an int32 vector: <2n x i32> -> <n x i32> (LLVM matches this plus the
    widening multiply to pmaddwd)."""
    n = v.type.count // 2
    ev = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, n), list(range(0, 2 * n, 2))))
    od = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, n), list(range(1, 2 * n, 2))))
    return builder.add(ev, od)


def _half_splat(builder, p, n=8):
    """The fp16 at p as an <n x float> splat (vpbroadcastw from memory + vcvtph2ps). Every lane is used by
    the caller, so LLVM cannot narrow it to a scalar half load, which it lowers to vpinsrw into whatever
    register is free, often the loop's accumulator: that false dependency chained every block to the
    previous one (3x slower row dots in a fused kernel, 5% in the dense matmul; A/B in one process)."""
    h = builder.load(builder.bitcast(p, ir.HalfType().as_pointer()), align=1)
    return builder.fpext(_splat_f(builder, h, n), ir.VectorType(ir.FloatType(), n))


def _splat_f(builder, value, n=8):
    """A scalar (float, half or int) as an <n x same type> splat."""
    v = ir.VectorType(value.type, n)
    return builder.shuffle_vector(builder.insert_element(ir.Constant(v, ir.Undefined), value, ir.Constant(_i32, 0)),
                                  ir.Constant(v, ir.Undefined), ir.Constant(ir.VectorType(_i32, n), [0] * n))


def _hsum8(builder, v):
    """The sum of an <8 x float>'s lanes (once per row, after the block loop)."""
    s = builder.extract_element(v, ir.Constant(_i32, 0))
    for i in range(1, 8):
        s = builder.fadd(s, builder.extract_element(v, ir.Constant(_i32, i)))
    return s


def _hsum8_ggml(builder, v):
    """The sum of an <8 x float>'s lanes in ggml's order (hsum_float_8: the upper half added to the lower, then lanes
    2-3 to 0-1, then lane 1 to 0), for dots whose rounding should be llama.cpp's."""
    e = lambda i: builder.extract_element(v, ir.Constant(_i32, i))  # noqa: E731
    r = [builder.fadd(e(i + 4), e(i)) for i in range(4)]
    return builder.fadd(builder.fadd(r[0], r[2]), builder.fadd(r[1], r[3]))


def _row_dot(context, builder, sig, args, block_bytes, block_lanes):
    """Shared body of the row-dot intrinsics: sum over nb blocks of d_w[b] * d_x[b] * idot(b), with
    an <8 x float> accumulator and one horizontal reduction at the end (as llama.cpp's AVX2 code)."""
    w, woff, nb, x, xoff, xd, xdoff = args
    f32, v8f = ir.FloatType(), ir.VectorType(ir.FloatType(), 8)
    wp = _ptr(context, builder, sig.args[0], w, woff)
    xp = _ptr(context, builder, sig.args[3], x, builder.mul(xoff, ir.Constant(xoff.type, 2)))  # int16 elements
    xdp = builder.bitcast(_ptr(context, builder, sig.args[5], xd, builder.mul(xdoff, ir.Constant(xdoff.type, 4))),
                          f32.as_pointer())
    acc = cgutils.alloca_once_value(builder, ir.Constant(v8f, [0.0] * 8))
    with cgutils.for_range(builder, nb) as loop:
        b = loop.index
        pb = builder.gep(wp, [builder.mul(b, ir.Constant(b.type, block_bytes))])
        xb = builder.gep(xp, [builder.mul(b, ir.Constant(b.type, 64))])  # 32 int16 per block
        d_x = builder.load(builder.gep(xdp, [b]), align=4)
        lanes = block_lanes(builder, builder.gep(pb, [ir.Constant(_i32, 2)]), xb)  # <8 x i32>
        splat = builder.fmul(_half_splat(builder, pb), _splat_f(builder, d_x))  # d_w * d_x in every lane
        prod = builder.fmul(builder.sitofp(lanes, v8f), splat)
        builder.store(builder.fadd(builder.load(acc), prod), acc)
    return _hsum8(builder, builder.load(acc))


def _x_halves(builder, xp):
    """The two 16-lane halves of an activation block of 32 int16 at xp."""
    v16i16 = ir.VectorType(_i16, 16)
    p = builder.bitcast(xp, v16i16.as_pointer())
    return builder.load(p, align=2), builder.load(builder.gep(p, [ir.Constant(_i32, 1)]), align=2)


def _widen_madd(builder, q, x):
    """<16 x i8> weights q and <16 x i16> activations x -> <8 x i32> pairwise sums of products
    (pmaddwd after sign-extending q to i16)."""
    v16i16, v16i32 = ir.VectorType(_i16, 16), ir.VectorType(_i32, 16)
    prod = builder.mul(builder.sext(builder.sext(q, v16i16), v16i32), builder.sext(x, v16i32))
    return _even_odd_add(builder, prod)


def _q4_0_lanes(builder, qp, xp):
    q = _vload(builder, qp, 16)
    lo = builder.sub(builder.and_(q, _splat(16, 15)), _splat(16, 8))
    hi = builder.sub(builder.lshr(q, _splat(16, 4)), _splat(16, 8))
    xlo, xhi = _x_halves(builder, xp)
    return builder.add(_widen_madd(builder, lo, xlo), _widen_madd(builder, hi, xhi))


def _q8_0_lanes(builder, qp, xp):
    xlo, xhi = _x_halves(builder, xp)
    qhi = _vload(builder, builder.gep(qp, [ir.Constant(_i32, 16)]), 16)
    return builder.add(_widen_madd(builder, _vload(builder, qp, 16), xlo), _widen_madd(builder, qhi, xhi))


def _q5_0_lanes(builder, qp, xp):
    """Q5_0's block after its scale: qh (32 fifth bits, little-endian), then Q4_0's nibble layout; values q - 16."""
    v16i32 = ir.VectorType(_i32, 16)
    qh = _splat_f(builder, builder.load(builder.bitcast(qp, _i32.as_pointer()), align=1), 16)
    q = _vload(builder, builder.gep(qp, [ir.Constant(_i32, 4)]), 16)

    def fifth(shift0):  # <16 x i8>: bit (shift0 + j) of qh, moved to bit 4
        bits = builder.lshr(qh, ir.Constant(v16i32, list(range(shift0, shift0 + 16))))
        return builder.shl(builder.trunc(builder.and_(bits, ir.Constant(v16i32, [1] * 16)), ir.VectorType(_i8, 16)),
                           _splat(16, 4))

    lo = builder.sub(builder.or_(builder.and_(q, _splat(16, 15)), fifth(0)), _splat(16, 16))
    hi = builder.sub(builder.or_(builder.lshr(q, _splat(16, 4)), fifth(16)), _splat(16, 16))
    xlo, xhi = _x_halves(builder, xp)
    return builder.add(_widen_madd(builder, lo, xlo), _widen_madd(builder, hi, xhi))


def _row_dot_intrinsic(block_bytes, block_lanes, doc):
    @intrinsic
    def row_dot(typingctx, w, woff, nb, x, xoff, xd, xdoff):
        sig = types.float32(w, woff, nb, x, xoff, xd, xdoff)

        def codegen(context, builder, signature, args):
            return _row_dot(context, builder, signature, args, block_bytes, block_lanes)

        return sig, codegen

    row_dot.__doc__ = doc
    return row_dot


_ROW_DOT_DOC = """Dot of {name} blocks at w+woff (nb blocks of {bb} bytes: fp16 scale, then quants) with
activations rounded to int8 and stored as int16 at x[xoff:] (flat element index, 32 per block; kept
widened so the row loop only widens the weights), whose float32 block scales are xd[xdoff : xdoff+nb]."""
dot_row_q4_0 = _row_dot_intrinsic(18, _q4_0_lanes, _ROW_DOT_DOC.format(name="Q4_0", bb=18))
dot_row_q8_0 = _row_dot_intrinsic(34, _q8_0_lanes, _ROW_DOT_DOC.format(name="Q8_0", bb=34))
dot_row_q5_0 = _row_dot_intrinsic(22, _q5_0_lanes, _ROW_DOT_DOC.format(name="Q5_0", bb=22).replace(
    "then quants", "32 fifth bits, then nibbles"))


def _prefetch_line(builder, p):
    """llvm.prefetch of the cache line at byte pointer p into L2 (locality 2: more requests can be in flight
    than for L1, measured faster for row gathers; locality 1 measured alike, 3 and 0 1.4x slower in pack_ffn)."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [_i8.as_pointer(), _i32, _i32, _i32]),
                                        "llvm.prefetch.p0i8")
    builder.call(fn, [p, ir.Constant(_i32, 0), ir.Constant(_i32, 2), ir.Constant(_i32, 1)])


@intrinsic
def prefetch(typingctx, arr, off, nbytes):
    """Hint the cache to load arr's bytes [off, off+nbytes), one line per 64 bytes (_prefetch_line): a
    gathered row starts where the hardware prefetcher has no stream running."""
    sig = types.void(arr, off, nbytes)

    def codegen(context, builder, signature, args):
        p = _ptr(context, builder, signature.args[0], args[0], args[1])
        with cgutils.for_range_slice(builder, ir.Constant(args[2].type, 0), args[2], ir.Constant(args[2].type, 64)) as (i, _):
            _prefetch_line(builder, builder.gep(p, [i]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def dot_row_f32(typingctx, w, woff, n, x):
    """Dot of the n float32 values at w's byte offset woff (any alignment) with x's first n values (a
    float32 array, C-contiguous): <8 x float> loads and accumulator, one horizontal sum, a scalar tail."""
    sig = types.float32(w, woff, n, x)

    def codegen(context, builder, signature, args):
        w_a, woff_v, n_v, x_a = args
        f32, v8f = ir.FloatType(), ir.VectorType(ir.FloatType(), 8)
        i64 = ir.IntType(64)
        wp = builder.bitcast(_ptr(context, builder, signature.args[0], w_a, woff_v), f32.as_pointer())
        xp = builder.bitcast(context.make_array(signature.args[3])(context, builder, x_a).data, f32.as_pointer())
        n = builder.sext(n_v, i64) if n_v.type.width < 64 else n_v
        acc = cgutils.alloca_once_value(builder, ir.Constant(v8f, [0.0] * 8))
        with cgutils.for_range(builder, builder.udiv(n, ir.Constant(i64, 8))) as loop:
            k = builder.mul(loop.index, ir.Constant(i64, 8))
            wv = builder.load(builder.bitcast(builder.gep(wp, [k]), v8f.as_pointer()), align=1)
            xv = builder.load(builder.bitcast(builder.gep(xp, [k]), v8f.as_pointer()), align=4)
            builder.store(builder.fadd(builder.load(acc), builder.fmul(wv, xv)), acc)
        out = cgutils.alloca_once_value(builder, _hsum8(builder, builder.load(acc)))
        with cgutils.for_range_slice(builder, builder.mul(builder.udiv(n, ir.Constant(i64, 8)), ir.Constant(i64, 8)), n,
                                     ir.Constant(i64, 1)) as (i, _):
            wv = builder.load(builder.gep(wp, [i]), align=1)
            builder.store(builder.fadd(builder.load(out), builder.fmul(wv, builder.load(builder.gep(xp, [i])))), out)
        return builder.load(out)

    return sig, codegen


def _i8x32_floats(builder, qp):
    """32 int8 at qp as <32 x float>."""
    return builder.sitofp(_vload(builder, qp, 32), ir.VectorType(ir.FloatType(), 32))


def _q4x32_floats(builder, qp):
    """32 4-bit values in 16 bytes at qp (value j in the low nibble of byte j, j+16 in its high
    nibble, offset by 8, as Q4_0) as <32 x float>. The bytes are widened to int32 lanes first and split
    there (no byte shuffles: 7% faster axpy than splitting the bytes, A/B in one process)."""
    w = builder.zext(_vload(builder, qp, 16), ir.VectorType(_i32, 16))
    lo = builder.sub(builder.and_(w, _splat(16, 15, _i32)), _splat(16, 8, _i32))
    hi = builder.sub(builder.lshr(w, _splat(16, 4, _i32)), _splat(16, 8, _i32))
    both = builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_i32, 32), list(range(32))))
    return builder.sitofp(both, ir.VectorType(ir.FloatType(), 32))


def _f32x32(builder, qp):
    """32 float32 at qp."""
    return builder.load(builder.bitcast(qp, ir.VectorType(ir.FloatType(), 32).as_pointer()), align=1)


def _axpy_units_intrinsic(block_bytes, block_floats, scaled):
    @intrinsic
    def axpy_units(typingctx, acc, u, offs, h, cnt, nb):
        sig = types.void(acc, u, offs, h, cnt, nb)

        def codegen(context, builder, signature, args):
            acc_a, u_a, o_a, h_a, cnt_v, nb_v = args
            i64, f32 = ir.IntType(64), ir.FloatType()
            v32f = ir.VectorType(f32, 32)
            arr = lambda k, v: context.make_array(signature.args[k])(context, builder, v)
            A, U, O, H = arr(0, acc_a), arr(1, u_a), arr(2, o_a), arr(3, h_a)
            accp = builder.bitcast(A.data, v32f.as_pointer())
            ub = builder.bitcast(U.data, _i8.as_pointer())
            cnt = builder.sext(cnt_v, i64) if cnt_v.type.width < 64 else cnt_v
            nb = builder.sext(nb_v, i64) if nb_v.type.width < 64 else nb_v
            scales = builder.mul(nb, ir.Constant(i64, block_bytes))  # the fp16 scales follow the quants
            with cgutils.for_range(builder, nb) as blk:
                b = blk.index
                ap = builder.gep(accp, [b])
                total = cgutils.alloca_once_value(builder, builder.load(ap, align=4))
                with cgutils.for_range(builder, cnt) as grp:
                    g = grp.index
                    base = builder.gep(ub, [builder.load(builder.gep(O.data, [g]))])
                    f = _splat_f(builder, builder.load(builder.gep(H.data, [g])), 32)
                    if scaled:  # a splat of the fp16 scale (_half_splat: no false dependency)
                        sp = builder.gep(base, [builder.add(scales, builder.mul(b, ir.Constant(i64, 2)))])
                        f = builder.fmul(f, _half_splat(builder, sp, 32))
                    qv = block_floats(builder, builder.gep(base, [builder.mul(b, ir.Constant(i64, block_bytes))]))
                    builder.store(builder.fadd(builder.load(total), builder.fmul(qv, f)), total)
                builder.store(builder.load(total), ap, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return axpy_units


_AXPY_DOC = """acc[:] += sum_{{g < cnt}} h[g] * column(offs[g]) over nb blocks of 32 values: a group of kept neurons'
down columns, each {kind} at byte offset offs[g] of u{scales}, added to acc (32 nb,) float32. Each 32-value
slice of acc is loaded and stored once per group rather than once per neuron."""
_SCALES = " (nb blocks of quants, then nb fp16 scales)"
axpy_units_q4 = _axpy_units_intrinsic(16, _q4x32_floats, True)
axpy_units_q4.__doc__ = _AXPY_DOC.format(kind="4-bit (Q4_0 nibble order, offset 8)", scales=_SCALES)
axpy_units_i8 = _axpy_units_intrinsic(32, _i8x32_floats, True)
axpy_units_i8.__doc__ = _AXPY_DOC.format(kind="int8", scales=_SCALES)
axpy_units_f32 = _axpy_units_intrinsic(128, _f32x32, False)
axpy_units_f32.__doc__ = _AXPY_DOC.format(kind="float32", scales="")


def _fma(builder, a, b, c):
    """a * b + c on <n x float>, fused (one instruction, one rounding)."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(a.type, [a.type] * 3),
                                        f"llvm.fma.v{a.type.count}f32")
    return builder.call(fn, [a, b, c])


def _nibbles32(builder, qp):
    """The 32 nibbles of a Q4_0 block's 16 quant bytes at qp as <32 x i8> 0..15, low nibbles first: the bytes
    loaded into both 128-bit halves, the upper half shifted by 4 (vbroadcasti128, vpsrlvq, vpand: one
    instruction fewer than splitting and re-joining two halves)."""
    q = _vload(builder, qp, 16)
    both = builder.shuffle_vector(q, q, ir.Constant(ir.VectorType(_i32, 32), list(range(16)) * 2))
    i64x4 = ir.VectorType(ir.IntType(64), 4)
    both = builder.lshr(builder.bitcast(both, i64x4), ir.Constant(i64x4, [0, 0, 4, 4]))
    return builder.and_(builder.bitcast(both, ir.VectorType(_i8, 32)), _splat(32, 15))


def _vpdpbusd(builder):
    """llvm.x86.avx512.vpdpbusd.256: (acc <8 x i32>, unsigned bytes, signed bytes) -> acc + 4-byte dot per lane."""
    v8i = ir.VectorType(_i32, 8)
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8i, [v8i, v8i, v8i]),
                                          "llvm.x86.avx512.vpdpbusd.256")


def _bias_ptr(context, builder, arrty, arr, blk, per_block):
    """The activations' offset terms from block blk on: xb (8 int32 a block, as <8 x i32>*) or xs (per_block = 1:
    one int32 a block, as i32*; the repacked Q4_0 dots, see quant.quantize_acts)."""
    ty = ir.VectorType(_i32, 8) if per_block == 8 else _i32
    return builder.bitcast(_ptr(context, builder, arrty, arr, builder.mul(blk, ir.Constant(blk.type, 4 * per_block))),
                           ty.as_pointer())


def _vnni_dot_setup(context, builder, sig, args, per_block=8):
    """The VNNI row dots' pointers (weights, x8, xd as float*, the offset terms: _bias_ptr) and vpdpbusd."""
    w, woff, nb, x8, xoff, xd, xb, xdoff = args
    f32 = ir.FloatType()
    wp = _ptr(context, builder, sig.args[0], w, woff)
    xp = _ptr(context, builder, sig.args[3], x8, xoff)
    xdp = builder.bitcast(_ptr(context, builder, sig.args[5], xd, builder.mul(xdoff, ir.Constant(xdoff.type, 4))),
                          f32.as_pointer())
    return wp, xp, xdp, _bias_ptr(context, builder, sig.args[6], xb, xdoff, per_block), _vpdpbusd(builder)


def _row_dot_q4_0_vnni(context, builder, sig, args):
    nb = args[2]
    v8f, v8i = ir.VectorType(ir.FloatType(), 8), ir.VectorType(_i32, 8)
    v32i8 = ir.VectorType(_i8, 32)
    wp, xp, xdp, xbp, dp = _vnni_dot_setup(context, builder, sig, args)
    accs = [cgutils.alloca_once_value(builder, ir.Constant(v8f, [0.0] * 8)) for _ in range(2)]

    def block(b, acc):
        pb = builder.gep(wp, [builder.mul(b, ir.Constant(b.type, 18))])
        splat = builder.fmul(_half_splat(builder, pb), _splat_f(builder, builder.load(builder.gep(xdp, [b]), align=4)))
        xv = builder.load(builder.bitcast(builder.gep(xp, [builder.mul(b, ir.Constant(b.type, 32))]), v32i8.as_pointer()),
                          align=1)
        # the accumulator input of vpdpbusd starts at -8 * (the lane's 4 activations): signed result, no bias term
        lanes = builder.call(dp, [builder.load(builder.gep(xbp, [b]), align=4),
                                  builder.bitcast(_nibbles32(builder, builder.gep(pb, [ir.Constant(_i32, 2)])), v8i),
                                  builder.bitcast(xv, v8i)])
        builder.store(_fma(builder, builder.sitofp(lanes, v8f), splat, builder.load(acc)), acc)

    two = ir.Constant(nb.type, 2)
    pairs = builder.udiv(nb, two)
    with cgutils.for_range(builder, pairs) as loop:  # two accumulators: the FMA chains interleave
        block(builder.mul(loop.index, two), accs[0])
        block(builder.add(builder.mul(loop.index, two), ir.Constant(nb.type, 1)), accs[1])
    with cgutils.for_range_slice(builder, builder.mul(pairs, two), nb, ir.Constant(nb.type, 1)) as (b, _):
        block(b, accs[0])
    return _hsum8(builder, builder.fadd(builder.load(accs[0]), builder.load(accs[1])))


@intrinsic
def dot_row_q4_0_vnni(typingctx, w, woff, nb, x8, xoff, xd, xb, xdoff):
    """dot_row_q4_0 for CPUs with AVX512-VNNI (x86 only; callers check quant.HAS_VNNI first): vpdpbusd multiplies
    the 32 unsigned nibbles of a block (0..15, no -8 offset) by 32 int8 activations at x8[xoff:] in one
    instruction, accumulating onto xb[8 xdoff + 8 b:][:8] (int32, -8 times each lane's 4 activations; see
    quant.quantize_acts), which takes the offset back out. Block scales d_w * xd[xdoff + b]. Two FMA accumulators.
    In one process against the form with a per-block scalar bias term: 23% faster from cache, 6% on a
    TinyLlama-sized matvec from DRAM; that form was 12% faster than the generic vpmaddwd one."""
    sig = types.float32(w, woff, nb, x8, xoff, xd, xb, xdoff)

    def codegen(context, builder, signature, args):
        return _row_dot_q4_0_vnni(context, builder, signature, args)

    return sig, _vnni_or_trap(codegen)


def _q4_0r_group_sums(builder, dp, gps, b0, xps, xsps):
    """The exact int32 dots of a whole repacked Q4_0 group (blocks b0 .. b0 + 7) of each row at gps with each
    token's activations: sums[row][token] <8 x i32>, lane k the dot of block b0 + k.
    The group's 128 quant bytes are 4 chunks of 32 (quant.repack_q4_0): chunk j's byte 4k + m holds block k's
    weights 8j + m (low nibble) and 8j + 4 + m (high nibble), and the activations come transposed to match
    (quant.quantize_acts' xt: vector i's lane k = block k's values 4i .. 4i + 3). So each vpdpbusd adds 4
    products of every block to that block's own lane: 8 of them make the 8 block dots, with no horizontal
    reduction. The high nibbles are used in place (and 0xF0: 16 times their value, exact in int32) and their
    sums shifted back once; the offset terms xs (-8 times each block's activation sum) seed a chain.
    From L1, 1.8x faster than lanes per block reduced by shuffles; bit-identical sums."""
    G = Q4_0R_GROUP
    v8i, i64 = ir.VectorType(_i32, 8), ir.IntType(64)
    zero, four = ir.Constant(v8i, [0] * 8), ir.Constant(v8i, [4] * 8)
    nibs = []  # [row][chunk] (low, 16 x high) as <8 x i32>
    for gp in gps:
        chunks = [_vload(builder, builder.gep(gp, [ir.Constant(i64, 2 * G + 32 * j)]), 32) for j in range(4)]
        nibs.append([(builder.bitcast(builder.and_(v, _splat(32, 15)), v8i),
                      builder.bitcast(builder.and_(v, _splat(32, -16)), v8i)) for v in chunks])
    sums = [[None] * len(xps) for _ in gps]
    for t, (xp, xsp) in enumerate(zip(xps, xsps)):
        xg = builder.gep(xp, [builder.mul(b0, ir.Constant(i64, 32))])
        xv = [builder.load(builder.bitcast(builder.gep(xg, [ir.Constant(i64, 32 * i)]), v8i.as_pointer()), align=1)
              for i in range(8)]
        bias = builder.load(builder.bitcast(builder.gep(xsp, [b0]), v8i.as_pointer()), align=4)
        for r in range(len(gps)):
            lo, hi = [bias, zero], [zero, zero]  # two chains each: half the dependent vpdpbusd latency
            for j, (nl, nh) in enumerate(nibs[r]):
                lo[j % 2] = builder.call(dp, [lo[j % 2], nl, xv[2 * j]])
                hi[j % 2] = builder.call(dp, [hi[j % 2], nh, xv[2 * j + 1]])
            sums[r][t] = builder.add(builder.add(lo[0], lo[1]), builder.ashr(builder.add(hi[0], hi[1]), four))
    return sums


def _q4_0r_dots(builder, wps, nb, xps, xdps, xsps, dp, gstride=18 * Q4_0R_GROUP, tail_at=None, each_group=None):
    """Dots of the repacked Q4_0 rows at wps (byte pointers) with the activations of tokens xps (xt) / xdps /
    xsps (xs), quant.quantize_acts' forms for these dots: dots[row][token]. Each block's nibbles are unpacked
    once for all tokens and each token's activations loaded once for all rows. Per (row, token): whole groups
    add their 8 block dots times the 8 scales in one FMA (_q4_0r_group_sums), the tail blocks theirs by block
    parity, and one horizontal sum ends it, so a result
    depends on neither the rows nor the tokens beside it (batch tiles equal one token at a time; a paired
    gate/up dot equals each row's own). A row's groups lie gstride bytes apart (its own groups back to back,
    or two rows' groups interleaved); tail_at(groups, m) gives the pointers of the rows' last, shorter groups
    (default: where the next group would start). each_group(g) emits extra code at the start of whole group g
    (dot_gate_up_q4_0r_vnni's prefetches)."""
    G = Q4_0R_GROUP
    v8f, v8i, i64 = ir.VectorType(ir.FloatType(), 8), ir.VectorType(_i32, 8), ir.IntType(64)
    nb = builder.sext(nb, i64) if nb.type.width < 64 else nb
    c = lambda v: ir.Constant(i64, v)
    accs = [[[cgutils.alloca_once_value(builder, ir.Constant(v8f, [0.0] * 8)) for _ in range(2)] for _ in xps]
            for _ in wps]  # [row][token][parity]
    scales8 = lambda p: builder.fpext(builder.load(builder.bitcast(p, ir.VectorType(ir.HalfType(), G).as_pointer()),
                                                   align=1), v8f)

    groups = builder.udiv(nb, c(G))
    with cgutils.for_range(builder, groups) as loop:  # whole groups: 8 scales in one load
        b0 = builder.mul(loop.index, c(G))
        if each_group is not None:
            each_group(loop.index)
        xd8s = [builder.load(builder.bitcast(builder.gep(xdp, [b0]), v8f.as_pointer()), align=4) for xdp in xdps]
        gps = [builder.gep(wp, [builder.mul(loop.index, c(gstride))]) for wp in wps]
        for gp, row_sums, row_accs in zip(gps, _q4_0r_group_sums(builder, dp, gps, b0, xps, xsps), accs):
            w8 = scales8(gp)
            for sums, xd8, a in zip(row_sums, xd8s, row_accs):
                builder.store(_fma(builder, builder.sitofp(sums, v8f), builder.fmul(w8, xd8), builder.load(a[0])), a[0])
    b0 = builder.mul(groups, c(G))  # the tail group, m < 8 blocks: m scales, then 16 m quant bytes
    m = builder.sub(nb, b0)
    tps = tail_at(groups, m) if tail_at else [builder.gep(wp, [builder.mul(groups, c(gstride))]) for wp in wps]
    with cgutils.for_range(builder, m) as loop:
        b = builder.add(b0, loop.index)
        odd = builder.trunc(loop.index, ir.IntType(1))  # block parity picks the accumulator, as in the GGUF-layout dot
        # tail blocks keep Q4_0's byte order (xt there is x8 as it is); the block's offset term seeds lane 0
        xs = [(builder.load(builder.bitcast(builder.gep(xp, [builder.mul(b, c(32))]), v8i.as_pointer()), align=1),
               builder.insert_element(ir.Constant(v8i, [0] * 8), builder.load(builder.gep(xsp, [b]), align=4),
                                      ir.Constant(_i32, 0)),
               _splat_f(builder, builder.load(builder.gep(xdp, [b]), align=4))) for xp, xdp, xsp in zip(xps, xdps, xsps)]
        for tp, row_accs in zip(tps, accs):
            nib = builder.bitcast(_nibbles32(builder, builder.gep(tp, [builder.add(builder.mul(m, c(2)),
                                                                                   builder.mul(loop.index, c(16)))])), v8i)
            ws = _half_splat(builder, builder.gep(tp, [builder.mul(loop.index, c(2))]))
            for (xv, xb, xds), a in zip(xs, row_accs):
                acc = builder.select(odd, a[1], a[0])
                lanes = builder.call(dp, [xb, nib, xv])
                builder.store(_fma(builder, builder.sitofp(lanes, v8f), builder.fmul(ws, xds), builder.load(acc)), acc)
    return [[_hsum8(builder, builder.fadd(builder.load(a[0]), builder.load(a[1]))) for a in row_accs]
            for row_accs in accs]


def _row_dot_q4_0r_vnni(context, builder, sig, args):
    wp, xp, xdp, xbp, dp = _vnni_dot_setup(context, builder, sig, args, per_block=1)
    return _q4_0r_dots(builder, [wp], args[2], [xp], [xdp], [xbp], dp)[0][0]


@intrinsic
def dot_row_q4_0r_vnni(typingctx, w, woff, nb, xt, xoff, xd, xs, xdoff):
    """dot_row_q4_0_vnni for a row in the repacked Q4_0 layout (quant.repack_q4_0: per group of 8 blocks, their 8
    fp16 scales, then their quants with the group's blocks across the lanes; a shorter group at the row's end),
    with the activations in the forms it reads (quant.quantize_acts: xt, xs; xd as for every int8 dot). The 8
    scales convert in one vcvtph2ps and multiply the activations' 8 block scales in one vmulps, and meet the
    group's 8 exact block dots (_q4_0r_group_sums) in one FMA. Against the GGUF-layout dot: the per-block scale
    load, conversion and multiply gone (a TinyLlama-sized matvec 11% faster from DRAM), then no horizontal
    reduction per block (1.8x faster from L1). The sum differs from the GGUF-layout dot's by float rounding only."""
    sig = types.float32(w, woff, nb, xt, xoff, xd, xs, xdoff)

    def codegen(context, builder, signature, args):
        return _row_dot_q4_0r_vnni(context, builder, signature, args)

    return sig, _vnni_or_trap(codegen)


TOKENS = 4  # tokens per call of dot_tokens_q4_0r_vnni


def _q4_0r_token_dots(builder, wp, nb, xps, xdps, xbps, dp):
    """One repacked Q4_0 row dotted with several tokens' activations (the token_dots form): _q4_0r_dots."""
    return _q4_0r_dots(builder, [wp], nb, xps, xdps, xbps, dp)[0]


def _q8_0_token_dots(builder, wp, nb, xps, xdps, xbps, dp):
    """A Q8_0 row (GGUF blocks: fp16 scale, 32 int8) dotted through vpdpbusd with one or more tokens' int8
    activations (pointers per token, as _q4_0r_token_dots). vpdpbusd multiplies unsigned by signed bytes, so
    the weights go in with their sign bit flipped (w + 128, one vpxor per block for all tokens) and each lane
    starts from 16 xb = -128 times its 4 activations' sum, which takes the offset back out: exact int32 lane
    sums. Per token two float accumulators by block parity and one horizontal sum, as the Q4_0 dots, so the
    one-token and the several-token forms give identical results."""
    v8f, v8i, i64 = ir.VectorType(ir.FloatType(), 8), ir.VectorType(_i32, 8), ir.IntType(64)
    nb = builder.sext(nb, i64) if nb.type.width < 64 else nb
    c = lambda v: ir.Constant(i64, v)
    accs = [[cgutils.alloca_once_value(builder, ir.Constant(v8f, [0.0] * 8)) for _ in range(2)] for _ in xps]

    def block(b, acc_of):
        bp = builder.gep(wp, [builder.mul(b, c(34))])
        q = builder.bitcast(builder.xor(_vload(builder, builder.gep(bp, [c(2)]), 32), _splat(32, -128)), v8i)
        ws = _half_splat(builder, bp)
        for xp, xdp, xbp, acc in zip(xps, xdps, xbps, accs):
            xv = builder.load(builder.bitcast(builder.gep(xp, [builder.mul(b, c(32))]), v8i.as_pointer()), align=1)
            init = builder.shl(builder.load(builder.gep(xbp, [b]), align=4), _splat(8, 4, _i32))
            lanes = builder.call(dp, [init, q, xv])
            scale = builder.fmul(ws, _splat_f(builder, builder.load(builder.gep(xdp, [b]), align=4)))
            a = acc_of(acc)
            builder.store(_fma(builder, builder.sitofp(lanes, v8f), scale, builder.load(a)), a)

    pairs = builder.udiv(nb, c(2))
    with cgutils.for_range(builder, pairs) as loop:  # two accumulators: the FMA chains interleave
        block(builder.mul(loop.index, c(2)), lambda a: a[0])
        block(builder.add(builder.mul(loop.index, c(2)), c(1)), lambda a: a[1])
    with cgutils.for_range_slice(builder, builder.mul(pairs, c(2)), nb, c(1)) as (b, _):
        block(b, lambda a: a[0])
    return [_hsum8(builder, builder.fadd(builder.load(a[0]), builder.load(a[1]))) for a in accs]


def _q5_0_token_dots(builder, wp, nb, xps, xdps, xbps, dp):
    """A Q5_0 row (blocks of 22 bytes: fp16 scale, qh with the 32 fifth bits, 16 nibble bytes; value = q - 16)
    dotted through vpdpbusd with one or more tokens' int8 activations, as _q8_0_token_dots: the 32 unsigned 5-bit
    values assembled once per block for all tokens (nibbles split, fifth bits moved in from qh), each lane starting
    from 2 xb = -16 times its 4 activations' sum, which takes the offset out: exact int32 sums. The floats round as
    llama.cpp's (vec_dot_q5_0_q8_0 and its tinyBLAS batch kernel): one FMA chain over the blocks, ggml's lane sum.
    Q5_0 rows are the q/k/gate/up of small models whose output a real model amplifies (Gemma 3 270M), so the order
    is worth its single chain."""
    v8f, v8i, i64 = ir.VectorType(ir.FloatType(), 8), ir.VectorType(_i32, 8), ir.IntType(64)
    v32i32 = ir.VectorType(_i32, 32)
    nb = builder.sext(nb, i64) if nb.type.width < 64 else nb
    c = lambda v: ir.Constant(i64, v)
    accs = [cgutils.alloca_once_value(builder, ir.Constant(v8f, [0.0] * 8)) for _ in xps]
    shifts, ones = ir.Constant(v32i32, list(range(32))), ir.Constant(v32i32, [1] * 32)
    with cgutils.for_range(builder, nb) as loop:
        b = loop.index
        bp = builder.gep(wp, [builder.mul(b, c(22))])
        qs = _vload(builder, builder.gep(bp, [c(6)]), 16)
        lo, hi = builder.and_(qs, _splat(16, 15)), builder.lshr(qs, _splat(16, 4))
        nib = builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_i32, 32), list(range(32))))  # values 0..31
        qh = _splat_f(builder, builder.load(builder.bitcast(builder.gep(bp, [c(2)]), _i32.as_pointer()), align=1), 32)
        fifth = builder.trunc(builder.and_(builder.lshr(qh, shifts), ones), ir.VectorType(_i8, 32))
        q = builder.bitcast(builder.or_(nib, builder.shl(fifth, _splat(32, 4))), v8i)
        ws = _half_splat(builder, bp)
        for xp, xdp, xbp, a in zip(xps, xdps, xbps, accs):
            xv = builder.load(builder.bitcast(builder.gep(xp, [builder.mul(b, c(32))]), v8i.as_pointer()), align=1)
            init = builder.shl(builder.load(builder.gep(xbp, [b]), align=4), _splat(8, 1, _i32))
            lanes = builder.call(dp, [init, q, xv])
            scale = builder.fmul(ws, _splat_f(builder, builder.load(builder.gep(xdp, [b]), align=4)))
            builder.store(_fma(builder, scale, builder.sitofp(lanes, v8f), builder.load(a)), a)
    return [_hsum8_ggml(builder, builder.load(a)) for a in accs]


def _kquant_token_dots(builder, nb, xps, xdps, xbps, dp, super_block):
    """Shared frame of the K-quant VNNI dots, for one token or several (pointers per token, as
    _q4_0r_token_dots): super_block(s, block) emits super-block s (8 activation blocks), calling
    block(j, q, init, scale, min_scale) per 32-value block j: q <32 x i8> unsigned weights (built once for all
    tokens), init the vpdpbusd accumulator input from the token's xb lanes, scale the float to multiply the exact
    lane sums by (a scalar or an <8 x float>), min_scale a scalar times the lanes of xb (-8 x each lane's
    activation sum), or None. Per token two accumulators by block parity, one for the min terms, one horizontal
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
                    builder.store(_fma(builder, builder.sitofp(xbv, v8f), builder.fmul(_splat_f(builder, min_scale), xd),
                                        builder.load(acc[2])), acc[2])

        super_block(s, block)
    eighth = ir.Constant(ir.FloatType(), 0.125)
    return [builder.fadd(_hsum8(builder, builder.fadd(builder.load(a[0]), builder.load(a[1]))),
                         builder.fmul(_hsum8(builder, builder.load(a[2])), eighth)) for a in accs]


def _kquant_tokens(super_block_of):
    """_kquant_token_dots for one K-quant type, in the token_dots form _row_intrinsic and _tokens_intrinsic take."""
    return lambda builder, wp, nb, xps, xdps, xbps, dp: _kquant_token_dots(builder, nb, xps, xdps, xbps, dp,
                                                                           super_block_of(builder, wp))


def _row_intrinsic(token_dots, doc):
    """A VNNI row dot with one token (the signature of dot_row_q4_0_vnni) through token_dots(builder, wp, nb, xps,
    xdps, xbps, dp), the same code _tokens_intrinsic runs for TOKENS tokens: the two forms give identical results."""
    @intrinsic
    def row_dot(typingctx, w, woff, nb, x8, xoff, xd, xb, xdoff):
        sig = types.float32(w, woff, nb, x8, xoff, xd, xb, xdoff)

        def codegen(context, builder, signature, args):
            wp, xp, xdp, xbp, dp = _vnni_dot_setup(context, builder, signature, args)
            return token_dots(builder, wp, args[2], [xp], [xdp], [xbp], dp)[0]

        return sig, _vnni_or_trap(codegen)

    row_dot.__doc__ = doc
    return row_dot


def _q45_k_super_block(builder, wp, five):
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


def _q4_k_super_block(builder, wp):
    return _q45_k_super_block(builder, wp, False)


def _q5_k_super_block(builder, wp):
    return _q45_k_super_block(builder, wp, True)


def _q6_k_super_block(builder, wp):
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


dot_row_q8_0_vnni = _row_intrinsic(_q8_0_token_dots, """A Q8_0 row's dot with one token's int8 activations through
    vpdpbusd (_q8_0_token_dots; x86 AVX512-VNNI only, as dot_row_q4_0_vnni): one xor and one vpdpbusd per block
    where the generic dot widens to int16 and runs two vpmaddwd.""")
dot_row_q5_0_vnni = _row_intrinsic(_q5_0_token_dots, """A Q5_0 row's dot with one token's int8 activations through
    vpdpbusd (_q5_0_token_dots; x86 AVX512-VNNI only).""")
dot_row_q4_k_vnni = _row_intrinsic(_kquant_tokens(_q4_k_super_block), """A Q4_K row's dot with one token's int8 activations through
    vpdpbusd (x86 AVX512-VNNI only): exact integer sums of nibbles times activations per 32-value sub-block, scaled
    by d sc_j and the activations' block scale; the mins' term from the activations' block sums (xb).""")
dot_row_q5_k_vnni = _row_intrinsic(_kquant_tokens(_q5_k_super_block), """dot_row_q4_k_vnni for Q5_K rows:
    each 32 values' nibbles take their 5th bit from qh before the vpdpbusd.""")
dot_row_q6_k_vnni = _row_intrinsic(_kquant_tokens(_q6_k_super_block), """A Q6_K row's dot with one token's int8 activations through
    vpdpbusd (x86 AVX512-VNNI only): the 6-bit values assembled from their low and high bits 32 at a time, exact
    integer sums per 32 values, each half of the lanes scaled by its 16 values' scale.""")


def _tokens_intrinsic(token_dots, doc, per_block=8):
    """An intrinsic dotting one row with TOKENS tokens through token_dots (the batch matmuls' inner call): token
    k's activations at x8[xoff + k xstride:], its block scales and offset terms (per_block int32 a block:
    _bias_ptr) from block xdoff + k xdstride."""
    @intrinsic
    def dot_tokens(typingctx, w, woff, nb, x8, xoff, xstride, xd, xb, xdoff, xdstride):
        sig = types.UniTuple(types.float32, TOKENS)(w, woff, nb, x8, xoff, xstride, xd, xb, xdoff, xdstride)

        def codegen(context, builder, signature, args):
            w_, woff_, nb_, x8_, xoff_, xstride_, xd_, xb_, xdoff_, xdstride_ = args
            f32 = ir.FloatType()
            wp = _ptr(context, builder, signature.args[0], w_, woff_)
            xps, xdps, xbps = [], [], []
            for k in range(TOKENS):
                kk = ir.Constant(xstride_.type, k)
                xps.append(_ptr(context, builder, signature.args[3], x8_, builder.add(xoff_, builder.mul(xstride_, kk))))
                xdo = builder.add(xdoff_, builder.mul(xdstride_, ir.Constant(xdstride_.type, k)))
                xdps.append(builder.bitcast(_ptr(context, builder, signature.args[6], xd_,
                                                 builder.mul(xdo, ir.Constant(xdo.type, 4))), f32.as_pointer()))
                xbps.append(_bias_ptr(context, builder, signature.args[7], xb_, xdo, per_block))
            return context.make_tuple(builder, signature.return_type,
                                      token_dots(builder, wp, nb_, xps, xdps, xbps, _vpdpbusd(builder)))

        return sig, _vnni_or_trap(codegen)

    dot_tokens.__doc__ = doc
    return dot_tokens


dot_tokens_q4_0r_vnni = _tokens_intrinsic(_q4_0r_token_dots, """dot_row_q4_0r_vnni of one row with TOKENS tokens'
    activations (_tokens_intrinsic; xt, xd, xs as it reads them): the row's nibbles are split and its scales
    converted once for all of them (a prompt batch's matmul, quant.matmul_q4_0r_vnni); each result is
    bit-identical to the one-token dot.""", per_block=1)


_KQ_TOKENS_DOC = """dot_row_{0}_vnni of one row with TOKENS tokens' activations (_tokens_intrinsic): each block's weights
    assembled once for all of them; each result identical to the one-token dot."""
dot_tokens_q4_k_vnni = _tokens_intrinsic(_kquant_tokens(_q4_k_super_block), _KQ_TOKENS_DOC.format("q4_k"))
dot_tokens_q5_k_vnni = _tokens_intrinsic(_kquant_tokens(_q5_k_super_block), _KQ_TOKENS_DOC.format("q5_k"))
dot_tokens_q6_k_vnni = _tokens_intrinsic(_kquant_tokens(_q6_k_super_block), _KQ_TOKENS_DOC.format("q6_k"))
dot_tokens_q5_0_vnni = _tokens_intrinsic(_q5_0_token_dots, """dot_row_q5_0_vnni of one row with TOKENS tokens'
    activations (_tokens_intrinsic): each block's values assembled once for all of them; each result identical to
    the one-token dot.""")
dot_tokens_q8_0_vnni = _tokens_intrinsic(_q8_0_token_dots, """dot_row_q8_0_vnni of one row with TOKENS tokens'
    activations (_tokens_intrinsic): each block's bytes flipped and its scale converted once for all of them;
    each result identical to the one-token dot.""")


@intrinsic
def dot_gate_up_q4_0r_vnni(typingctx, w, off, nb, xt, xoff, xd, xs, xdoff, pf, pf_lines):
    """(gate . x, up . x) for a neuron's gate and up rows, repacked Q4_0 (quant.repack_q4_0) and interleaved from
    byte off of w: each whole group of Q4_0R_GROUP blocks of the gate (144 bytes), then the up row's same group;
    then the gate's shorter last group, if any, and the up row's (ffn_pack.interleave_rows). One block loop
    over one stream of bytes: each block's activations (xt[xoff:], block scales and offset terms from xdoff, as
    dot_row_q4_0r_vnni reads them) are loaded once for both rows, and the rows' independent chains interleave. Each result is bit-identical to
    dot_row_q4_0r_vnni of that row.
    Where pf >= 0, whole group g also prefetches pf_lines cache lines of w from byte pf + 64 pf_lines g:
    pack_ffn's prefetch of a later unit, issued at the pace of the compute (see sparse.PREFETCH_AHEAD)."""
    sig = types.UniTuple(types.float32, 2)(w, off, nb, xt, xoff, xd, xs, xdoff, pf, pf_lines)

    def codegen(context, builder, signature, args):
        wp, xp, xdp, xbp, dp = _vnni_dot_setup(context, builder, signature, args[:8], per_block=1)
        gb = 18 * Q4_0R_GROUP
        i64 = ir.IntType(64)
        c = lambda v: ir.Constant(i64, v)
        w0 = _ptr(context, builder, signature.args[0], args[0], c(0))
        pf, k = [builder.sext(v, i64) if v.type.width < 64 else v for v in args[8:10]]

        def each_group(g):
            with builder.if_then(builder.icmp_signed(">=", pf, c(0))):
                at = builder.gep(w0, [builder.add(pf, builder.mul(builder.mul(g, k), c(64)))])
                with cgutils.for_range(builder, k) as line:
                    _prefetch_line(builder, builder.gep(at, [builder.mul(line.index, c(64))]))

        tail = lambda groups, m: [builder.gep(wp, [builder.mul(groups, c(2 * gb))]),
                                  builder.gep(wp, [builder.add(builder.mul(groups, c(2 * gb)), builder.mul(m, c(18)))])]
        dots = [d[0] for d in _q4_0r_dots(builder, [wp, builder.gep(wp, [c(gb)])], args[2], [xp], [xdp], [xbp], dp,
                                          2 * gb, tail, each_group)]
        return context.make_tuple(builder, signature.return_type, dots)

    return sig, _vnni_or_trap(codegen)


AXPY_Q4_COLUMNS = 8  # down columns axpy_q4_vnni adds per call: two vpdpbusd per half block into one int32 sum


@intrinsic
def coefs_q4_vnni(typingctx, u, offs, h, nb, qbytes, cw, cz, cs):
    """axpy_q4_vnni's int8 coefficients for AXPY_Q4_COLUMNS down columns at u[offs[g]:] (nb blocks of 16 quant
    bytes, then nb fp16 scales from byte qbytes): c_g = h[g] * scale(g, b), cs[b] = max_g
    |c_g| / 127, q_g = rint(c_g * 127 / max) (0 where the max is 0), cw[k nb + b] = q_4k..q_4k+3 as bytes of one
    int32, cz[b] = -8 * sum_g q_g; 16 blocks a vector, then the rest one at a time. Plain vector IR (no x86
    instruction): numba left the scalar loop over blocks unvectorized, 8.6 ns a neuron for four columns and 15.6
    for eight, against 7.2 here (from L2, separate runs; the max as a tree of selects: 12.8 with llvm.maxnum in
    a chain)."""
    sig = types.void(u, offs, h, nb, qbytes, cw, cz, cs)
    G = AXPY_Q4_COLUMNS

    def codegen(context, builder, signature, args):
        u_a, o_a, h_a, nb_v, qb_v, cw_a, cz_a, cs_a = args
        i64, f32, f16 = ir.IntType(64), ir.FloatType(), ir.HalfType()
        c = lambda v: ir.Constant(i64, v)
        arr = lambda k, v: context.make_array(signature.args[k])(context, builder, v)
        O, H, CW, CZ, CS = arr(1, o_a), arr(2, h_a), arr(5, cw_a), arr(6, cz_a), arr(7, cs_a)
        ub = builder.bitcast(arr(0, u_a).data, _i8.as_pointer())
        nb = builder.sext(nb_v, i64) if nb_v.type.width < 64 else nb_v
        qb = builder.sext(qb_v, i64) if qb_v.type.width < 64 else qb_v
        sp = [builder.bitcast(builder.gep(ub, [builder.add(builder.load(builder.gep(O.data, [c(g)])), qb)]), f16.as_pointer())
              for g in range(G)]
        hs = [builder.load(builder.gep(H.data, [c(g)])) for g in range(G)]

        def blocks(b, W):  # blocks b .. b + W - 1
            vf, vi = ir.VectorType(f32, W), ir.VectorType(_i32, W)
            fn = lambda name, ty: cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty]), f"llvm.{name}.v{W}f32")
            vec = lambda p, ty: builder.bitcast(builder.gep(p, [b]), ty.as_pointer())
            cg = [builder.fmul(builder.fpext(builder.load(vec(sp[g], ir.VectorType(f16, W)), align=1), vf),
                               _splat_f(builder, hs[g], W)) for g in range(G)]
            m = [builder.call(fn("fabs", vf), [x]) for x in cg]
            while len(m) > 1:  # a tree of plain compares and selects (vmaxps; maxnum's NaN rules cost 3 instructions)
                m = [builder.select(builder.fcmp_ordered(">", a, b), a, b) for a, b in zip(m[0::2], m[1::2])]
            m = m[0]
            zero = ir.Constant(vf, [0.0] * W)
            pos = builder.fcmp_ordered(">", m, zero)
            inv = builder.select(pos, builder.fdiv(ir.Constant(vf, [127.0] * W), builder.select(pos, m, ir.Constant(vf, [1.0] * W))), zero)
            q = [builder.fptosi(builder.call(fn("rint", vf), [builder.fmul(x, inv)]), vi) for x in cg]
            total = q[0]
            for g in range(1, G):
                total = builder.add(total, q[g])
            builder.store(builder.mul(total, _splat(W, -8, _i32)), vec(CZ.data, vi), align=4)
            builder.store(builder.fmul(m, ir.Constant(vf, [1.0 / 127.0] * W)), vec(CS.data, vf), align=4)
            for k in range(G // 4):
                w = builder.and_(q[4 * k], _splat(W, 255, _i32))
                for j in range(1, 4):
                    w = builder.or_(w, builder.shl(builder.and_(q[4 * k + j], _splat(W, 255, _i32)), _splat(W, 8 * j, _i32)))
                at = builder.add(builder.mul(nb, c(k)), b)
                builder.store(w, builder.bitcast(builder.gep(CW.data, [at]), vi.as_pointer()), align=4)

        full = builder.udiv(nb, c(16))
        with cgutils.for_range(builder, full) as loop:
            blocks(builder.mul(loop.index, c(16)), 16)
        with cgutils.for_range_slice(builder, builder.mul(full, c(16)), nb, c(1)) as (b, _):
            blocks(b, 1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def axpy_q4_vnni(typingctx, acc, u, offs, cw, cz, cs, nb, pf):
    """axpy_units_q4 for 8 neurons at once through vpdpbusd (x86 AVX512-VNNI only, see the module note):
    acc[32b : 32b+32] += cs[b] * sum_g cq[g, b] * (nibbles of column g, block b), where the int8 cq[g, b] (h_g
    times the column's block scale, rounded with one scale cs[b] per block: see sparse._coefs_i8) are packed
    four to an int32, columns 4k..4k+3 in cw[k nb + b], and cz[b] = -8 * sum_g cq[g, b] takes Q4_0's nibble
    offset back out. Per block and four columns, their 16 bytes are transposed into one 64-byte register (byte
    4k+g = column g's byte k: vpermb) so each int32 lane holds one output's 4 weights; the nibbles are split,
    and the two quads' vpdpbusd sum into one int32 lane per output, converted and added with one FMA per 16
    outputs. From L2, 29-33 against 38.5 ns a neuron for the 4-column form (whose per-quad convert, multiply and
    acc load/store this halves); the float axpy took 2.5x the 4-column form. The rounding adds at most 1/254 of
    the group's largest term to each output per block.
    pf (8,) int64: block b also prefetches two of u's cache lines, v = 2b and 2b + 1 at byte pf[v % 8] + 64
    (v // 8), none where pf[v % 8] < 0: pack_ffn's prefetch of later units' last lines, at the pace of the
    compute (nb / 4 lines of each unit per call)."""
    sig = types.void(acc, u, offs, cw, cz, cs, nb, pf)
    G, Q = AXPY_Q4_COLUMNS, AXPY_Q4_COLUMNS // 4

    def codegen(context, builder, signature, args):
        acc_a, u_a, o_a, cw_a, cz_a, cs_a, nb_v, pf_a = args
        i64, f32 = ir.IntType(64), ir.FloatType()
        c = lambda v: ir.Constant(i64, v)
        v16f, v16i = ir.VectorType(f32, 16), ir.VectorType(_i32, 16)
        arr = lambda k, v: context.make_array(signature.args[k])(context, builder, v)
        A, U, O, CW, CZ, CS = arr(0, acc_a), arr(1, u_a), arr(2, o_a), arr(3, cw_a), arr(4, cz_a), arr(5, cs_a)
        PF = arr(7, pf_a)
        accp = builder.bitcast(A.data, v16f.as_pointer())
        ub = builder.bitcast(U.data, _i8.as_pointer())
        nb = builder.sext(nb_v, i64) if nb_v.type.width < 64 else nb_v
        dp = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16i, [v16i, v16i, v16i]),
                                            "llvm.x86.avx512.vpdpbusd.512")
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16f, [v16f] * 3), "llvm.fma.v16f32")
        cols = [builder.gep(ub, [builder.load(builder.gep(O.data, [c(g)]))]) for g in range(G)]
        transpose = ir.Constant(ir.VectorType(_i32, 64), [16 * (j % 4) + j // 4 for j in range(64)])
        cat = lambda a, b: builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_i32, 2 * a.type.count),
                                                                    list(range(2 * a.type.count))))
        with cgutils.for_range(builder, nb) as blk:
            b = blk.index
            for k in range(Q):
                v = builder.add(builder.mul(b, c(Q)), c(k))
                at = builder.load(builder.gep(PF.data, [builder.urem(v, c(G))]))
                with builder.if_then(builder.icmp_signed(">=", at, c(0))):
                    _prefetch_line(builder, builder.gep(ub, [builder.add(at, builder.mul(builder.udiv(v, c(G)), c(64)))]))
            lanes = [_splat_f(builder, builder.load(builder.gep(CZ.data, [b])), 16)] * 2  # outputs 32b + 16k + (0..15)
            for k in range(Q):
                q = [_vload(builder, builder.gep(cols[4 * k + g], [builder.mul(b, c(16))]), 16) for g in range(4)]
                t = builder.shuffle_vector(cat(cat(q[0], q[1]), cat(q[2], q[3])),
                                           ir.Constant(ir.VectorType(_i8, 64), None), transpose)
                coef = builder.bitcast(_splat_f(builder, builder.load(builder.gep(CW.data, [builder.add(builder.mul(nb, c(k)), b)])),
                                                16), v16i)
                nibs = (builder.and_(t, _splat(64, 15)), builder.and_(builder.lshr(t, _splat(64, 4)), _splat(64, 15)))
                lanes = [builder.call(dp, [lanes[h], builder.bitcast(nibs[h], v16i), coef]) for h in range(2)]
            scale = _splat_f(builder, builder.load(builder.gep(CS.data, [b])), 16)
            for h in range(2):
                ap = builder.gep(accp, [builder.add(builder.mul(b, c(2)), c(h))])
                builder.store(builder.call(fma, [builder.sitofp(lanes[h], v16f), scale, builder.load(ap, align=4)]), ap, align=4)
        return context.get_dummy_value()

    return sig, _vnni_or_trap(codegen)


# Attention (kernels.ops.attention): a block of KEY_BLOCK keys is stored transposed, (head_dim, KEY_BLOCK), so one
# vector load holds one dimension of 16 keys and H queries' scores accumulate in H vector registers with no
# horizontal sums; value rows are summed into H x (8 ncols) accumulators held in registers across the keys.
KEY_BLOCK = 16


def _cache_floats(builder, arrty, p, n):
    """n consecutive cache values at byte pointer p as <n x float>: IEEE halves (uint16 caches) or float32."""
    if arrty.dtype == types.uint16:
        h = builder.load(builder.bitcast(p, ir.VectorType(ir.HalfType(), n).as_pointer()), align=2)
        return builder.fpext(h, ir.VectorType(ir.FloatType(), n))
    return builder.load(builder.bitcast(p, ir.VectorType(ir.FloatType(), n).as_pointer()), align=4)


def _f32_ptr(context, builder, arrty, arr, idx):
    """Pointer to float32 element idx of a float32 array."""
    off = builder.mul(_as_i64(builder, idx), ir.Constant(ir.IntType(64), 4))
    return builder.bitcast(_ptr(context, builder, arrty, arr, off), ir.FloatType().as_pointer())


def _as_i64(builder, v):
    return builder.sext(v, ir.IntType(64)) if v.type.width < 64 else v


def _key_block_dots(H):
    @intrinsic
    def key_block_dots(typingctx, kc, kidx, hd, qs, qidx, s, sidx, sstride):
        """s[sidx + h sstride + l] = sum_{d < hd} qs[qidx + h hd + d] * K[d, l] for h < H queries and l < KEY_BLOCK
        keys, the key block (hd, KEY_BLOCK) starting at element kidx of the cache kc (float32 or IEEE half bits)."""
        sig = types.void(kc, kidx, hd, qs, qidx, s, sidx, sstride)

        def codegen(context, builder, signature, args):
            kc_a, ki, hd_v, qs_a, qi, s_a, si, ss = args
            i64, v = ir.IntType(64), ir.VectorType(ir.FloatType(), KEY_BLOCK)
            c = lambda x: ir.Constant(i64, x)
            esize = c(2 if signature.args[0].dtype == types.uint16 else 4)
            kp = _ptr(context, builder, signature.args[0], kc_a, builder.mul(_as_i64(builder, ki), esize))
            qp = _f32_ptr(context, builder, signature.args[3], qs_a, qi)
            hd = _as_i64(builder, hd_v)
            accs = [cgutils.alloca_once_value(builder, ir.Constant(v, [0.0] * KEY_BLOCK)) for _ in range(H)]
            with cgutils.for_range(builder, hd) as loop:
                d = loop.index
                row = builder.gep(kp, [builder.mul(d, builder.mul(c(KEY_BLOCK), esize))])
                kv = _cache_floats(builder, signature.args[0], row, KEY_BLOCK)
                for h in range(H):
                    q = builder.load(builder.gep(qp, [builder.add(builder.mul(c(h), hd), d)]))
                    qv = _splat_f(builder, q, KEY_BLOCK)
                    builder.store(_fma(builder, kv, qv, builder.load(accs[h])), accs[h])
            sp = _f32_ptr(context, builder, signature.args[5], s_a, si)
            for h in range(H):
                dst = builder.gep(sp, [builder.mul(c(h), _as_i64(builder, ss))])
                builder.store(builder.load(accs[h]), builder.bitcast(dst, v.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return key_block_dots


def _value_rows_sum(H, NCH):
    @intrinsic
    def value_rows_sum(typingctx, vc, vidx, hd, n, w, widx, wstride, acc, aidx):
        """acc[aidx + h hd + c] += sum_{j < n} w[widx + h wstride + j] * V[j, c] for h < H weight rows and c < 8 NCH
        columns, value row j's columns from element vidx + j hd of the cache vc (float32 or IEEE half bits): the
        H x NCH accumulators stay in registers across the rows."""
        sig = types.void(vc, vidx, hd, n, w, widx, wstride, acc, aidx)

        def codegen(context, builder, signature, args):
            vc_a, vi, hd_v, n_v, w_a, wi, ws, acc_a, ai = args
            i64, v8 = ir.IntType(64), ir.VectorType(ir.FloatType(), 8)
            c = lambda x: ir.Constant(i64, x)
            esize = c(2 if signature.args[0].dtype == types.uint16 else 4)
            hd, ws = _as_i64(builder, hd_v), _as_i64(builder, ws)
            vp = _ptr(context, builder, signature.args[0], vc_a, builder.mul(_as_i64(builder, vi), esize))
            wp = _f32_ptr(context, builder, signature.args[4], w_a, wi)
            ap = _f32_ptr(context, builder, signature.args[7], acc_a, ai)
            accs = []
            for h in range(H):
                for k in range(NCH):
                    p = builder.bitcast(builder.gep(ap, [builder.add(builder.mul(c(h), hd), c(8 * k))]), v8.as_pointer())
                    accs.append((p, cgutils.alloca_once_value(builder, builder.load(p, align=4))))
            with cgutils.for_range(builder, _as_i64(builder, n_v)) as loop:
                j = loop.index
                row = builder.gep(vp, [builder.mul(builder.mul(j, hd), esize)])
                vv = [_cache_floats(builder, signature.args[0], builder.gep(row, [builder.mul(c(8 * k), esize)]), 8)
                      for k in range(NCH)]
                for h in range(H):
                    wv = _splat_f(builder, builder.load(builder.gep(wp, [builder.add(builder.mul(c(h), ws), j)])), 8)
                    for k in range(NCH):
                        a = accs[NCH * h + k][1]
                        builder.store(_fma(builder, vv[k], wv, builder.load(a)), a)
            for p, a in accs:
                builder.store(builder.load(a), p, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return value_rows_sum


ATTENTION_HEADS = (8, 4, 1)  # queries one key_block_dots / value_rows_sum call takes, largest first
key_block_dots = {H: _key_block_dots(H) for H in ATTENTION_HEADS}
value_rows_sum = {(H, NCH): _value_rows_sum(H, NCH) for H in ATTENTION_HEADS for NCH in (1, 2, 4)}
