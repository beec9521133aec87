"""LLVM vector-IR intrinsics for the block dot products numba will not vectorize on its own.

numba's loops over quantized blocks (a scale per 32 weights, nibbles to split) stay scalar. These
intrinsics emit generic LLVM vector IR (no x86-only intrinsics, so they also build for ARM): load a
block's packed quants, widen to int32 lanes, multiply with an int8-quantized activation block and
reduce. On AVX2 LLVM lowers the widen+multiply+pairwise-add pattern to vpmaddwd.

All pointers are (array, byte offset) pairs: callers validate offsets before any kernel runs
(see sparserun.gguf_file), so these do no bounds checks of their own.
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_i8, _i16, _i32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)


def _ptr(context, builder, arrty, arr, off):
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.gep(builder.bitcast(data, _i8.as_pointer()), [off])


def _vload(builder, ptr, n):
    vty = ir.VectorType(_i8, n)
    return builder.load(builder.bitcast(ptr, vty.as_pointer()), align=1)


def _reduce_add(builder, vec):
    n = vec.type.count
    fnty = ir.FunctionType(_i32, [vec.type])
    fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.vector.reduce.add.v{n}i32")
    return builder.call(fn, [vec])


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
def round_f16(typingctx, value):
    """value rounded to the nearest IEEE half, as float32 (llama.cpp stores block scales as fp16)."""
    sig = types.float32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())

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


def _load_half_nodep(builder, p):
    """fp16 at p as float, converted from a 4-lane vector load (blocks are >= 18 bytes, so reading 8 is
    in bounds): vcvtph2ps from memory writes a whole register. A scalar half load lowers to vpinsrw
    into a free register, often the loop's accumulator, which chains every block to the previous one."""
    v4h = ir.VectorType(ir.HalfType(), 4)
    vec = builder.load(builder.bitcast(p, v4h.as_pointer()), align=1)
    wide = builder.fpext(vec, ir.VectorType(ir.FloatType(), 4))
    return builder.extract_element(wide, ir.Constant(_i32, 0))


def _row_dot(context, builder, sig, args, block_bytes, block_lanes):
    """Shared body of the row-dot intrinsics: sum over nb blocks of d_w[b] * d_x[b] * idot(b), with
    an <8 x float> accumulator and one horizontal reduction at the end (as llama.cpp's AVX2 code)."""
    w, woff, nb, x, xoff, xd, xdoff = args
    f32, v8f = ir.FloatType(), ir.VectorType(ir.FloatType(), 8)
    wp = _ptr(context, builder, sig.args[0], w, woff)
    xp = _ptr(context, builder, sig.args[3], x, xoff)
    xdp = builder.bitcast(_ptr(context, builder, sig.args[5], xd, builder.mul(xdoff, ir.Constant(xdoff.type, 4))),
                          f32.as_pointer())
    acc = cgutils.alloca_once_value(builder, ir.Constant(v8f, [0.0] * 8))
    with cgutils.for_range(builder, nb) as loop:
        b = loop.index
        pb = builder.gep(wp, [builder.mul(b, ir.Constant(b.type, block_bytes))])
        xb = builder.gep(xp, [builder.mul(b, ir.Constant(b.type, 32))])
        d_w = _load_half_nodep(builder, pb)
        d_x = builder.load(builder.gep(xdp, [b]), align=4)
        lanes = block_lanes(builder, builder.gep(pb, [ir.Constant(_i32, 2)]), xb)  # <8 x i32>
        scale = builder.fmul(d_w, d_x)
        splat = builder.shuffle_vector(builder.insert_element(ir.Constant(v8f, ir.Undefined), scale, ir.Constant(_i32, 0)),
                                       ir.Constant(v8f, ir.Undefined), ir.Constant(ir.VectorType(_i32, 8), [0] * 8))
        prod = builder.fmul(builder.sitofp(lanes, v8f), splat)
        builder.store(builder.fadd(builder.load(acc), prod), acc)
    total = builder.load(acc)
    s = builder.extract_element(total, ir.Constant(_i32, 0))
    for i in range(1, 8):
        s = builder.fadd(s, builder.extract_element(total, ir.Constant(_i32, i)))
    return s


def _q4_0_lanes(builder, qp, xp):
    q = _vload(builder, qp, 16)
    lo = builder.sub(builder.and_(q, _splat(16, 15)), _splat(16, 8))
    hi = builder.sub(builder.lshr(q, _splat(16, 4)), _splat(16, 8))
    xlo, xhi = _vload(builder, xp, 16), _vload(builder, builder.gep(xp, [ir.Constant(_i32, 16)]), 16)
    return builder.add(_widen_madd(builder, lo, xlo), _widen_madd(builder, hi, xhi))


def _widen_madd(builder, a, b):
    """<16 x i8> a, b -> <8 x i32> of pairwise sums of products (pmaddwd after sign-extending to i16)."""
    v16i16, v16i32 = ir.VectorType(_i16, 16), ir.VectorType(_i32, 16)
    wide = lambda v: builder.sext(builder.sext(v, v16i16), v16i32)
    return _even_odd_add(builder, builder.mul(wide(a), wide(b)))


def _q8_0_lanes(builder, qp, xp):
    v32i16, v32i32 = ir.VectorType(_i16, 32), ir.VectorType(_i32, 32)
    wide = lambda v: builder.sext(builder.sext(v, v32i16), v32i32)
    p = _even_odd_add(builder, builder.mul(wide(_vload(builder, qp, 32)), wide(_vload(builder, xp, 32))))  # <16 x i32>
    lo = builder.shuffle_vector(p, p, ir.Constant(ir.VectorType(_i32, 8), list(range(8))))
    hi = builder.shuffle_vector(p, p, ir.Constant(ir.VectorType(_i32, 8), list(range(8, 16))))
    return builder.add(lo, hi)


def _row_dot_intrinsic(block_bytes, block_lanes, doc):
    @intrinsic
    def row_dot(typingctx, w, woff, nb, x, xoff, xd, xdoff):
        sig = types.float32(w, woff, nb, x, xoff, xd, xdoff)

        def codegen(context, builder, signature, args):
            return _row_dot(context, builder, signature, args, block_bytes, block_lanes)

        return sig, codegen

    row_dot.__doc__ = doc
    return row_dot


_ROW_DOT_DOC = """Dot of {name} blocks at w+woff (nb blocks of {bb} bytes: fp16 scale, then quants) with int8
activations at x+xoff (32 per block) whose float32 block scales are xd[xdoff : xdoff+nb] (xd flat index)."""
dot_row_q4_0 = _row_dot_intrinsic(18, _q4_0_lanes, _ROW_DOT_DOC.format(name="Q4_0", bb=18))
dot_row_q8_0 = _row_dot_intrinsic(34, _q8_0_lanes, _ROW_DOT_DOC.format(name="Q8_0", bb=34))


@intrinsic
def axpy_i8x32(typingctx, acc, aoff, q, qoff, f):
    """acc[aoff:aoff+32] += f * q[qoff:qoff+32] for float32 acc and int8 q (element offsets): the
    inner step of the neuron-major down projection (int8 widened, converted, scaled, accumulated)."""
    sig = types.void(acc, aoff, q, qoff, types.float32)

    def codegen(context, builder, signature, args):
        acc_arr, aoff_v, q_arr, qoff_v, f_v = args
        v32f = ir.VectorType(ir.FloatType(), 32)
        ap = _ptr(context, builder, signature.args[0], acc_arr, builder.mul(aoff_v, ir.Constant(aoff_v.type, 4)))
        ap = builder.bitcast(ap, v32f.as_pointer())
        qv = _vload(builder, _ptr(context, builder, signature.args[2], q_arr, qoff_v), 32)
        fs = builder.sitofp(qv, v32f)
        splat = builder.shuffle_vector(builder.insert_element(ir.Constant(v32f, ir.Undefined), f_v, ir.Constant(_i32, 0)),
                                       ir.Constant(v32f, ir.Undefined), ir.Constant(ir.VectorType(_i32, 32), [0] * 32))
        old = builder.load(ap, align=4)
        builder.store(builder.fadd(old, builder.fmul(fs, splat)), ap, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def prefetch(typingctx, arr, off, nbytes):
    """Hint the cache to load arr's bytes [off, off+nbytes), one line per 64 bytes (llvm.prefetch):
    a gathered row starts where the hardware prefetcher has no stream running."""
    sig = types.void(arr, off, nbytes)

    def codegen(context, builder, signature, args):
        p = _ptr(context, builder, signature.args[0], args[0], args[1])
        fnty = ir.FunctionType(ir.VoidType(), [_i8.as_pointer(), _i32, _i32, _i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        with cgutils.for_range_slice(builder, ir.Constant(args[2].type, 0), args[2], ir.Constant(args[2].type, 64)) as (i, _):
            builder.call(fn, [builder.gep(p, [i]), ir.Constant(_i32, 0), ir.Constant(_i32, 3), ir.Constant(_i32, 1)])
        return context.get_dummy_value()

    return sig, codegen
