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
def dot_q4_0_q8(typingctx, w, woff, x, xoff):
    """Integer dot of one Q4_0 block's 16 quant bytes (at w+woff) with 32 int8 activations (at x+xoff).

    Q4_0 stores element j in the low nibble of byte j and element j+16 in its high nibble, both
    offset by 8, so the two halves of the activation block line up with the two nibble lanes.
    """
    sig = types.int32(w, woff, x, xoff)

    def codegen(context, builder, signature, args):
        v16i32 = ir.VectorType(_i32, 16)
        q = _vload(builder, _ptr(context, builder, signature.args[0], args[0], args[1]), 16)
        xp = _ptr(context, builder, signature.args[2], args[2], args[3])
        xlo = _vload(builder, xp, 16)
        xhi = _vload(builder, builder.gep(xp, [ir.Constant(_i32, 16)]), 16)
        lo = builder.sub(builder.and_(q, _splat(16, 15)), _splat(16, 8))
        hi = builder.sub(builder.lshr(q, _splat(16, 4)), _splat(16, 8))
        plo = builder.mul(builder.sext(lo, v16i32), builder.sext(xlo, v16i32))
        phi = builder.mul(builder.sext(hi, v16i32), builder.sext(xhi, v16i32))
        return _reduce_add(builder, builder.add(plo, phi))

    return sig, codegen


@intrinsic
def dot_i8x32(typingctx, w, woff, x, xoff):
    """Integer dot of 32 int8 weights (Q8_0 quants, at w+woff) with 32 int8 activations (at x+xoff)."""
    sig = types.int32(w, woff, x, xoff)

    def codegen(context, builder, signature, args):
        v32i32 = ir.VectorType(_i32, 32)
        q = _vload(builder, _ptr(context, builder, signature.args[0], args[0], args[1]), 32)
        a = _vload(builder, _ptr(context, builder, signature.args[2], args[2], args[3]), 32)
        return _reduce_add(builder, builder.mul(builder.sext(q, v32i32), builder.sext(a, v32i32)))

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
