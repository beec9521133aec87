"""A layer's FFN laid out neuron by neuron for the sparse decode kernels: one contiguous unit per neuron.

Unit i (bytes) = [ gate row i | up row i | down column i ]
- gate and up rows in the GGUF's own row formats (or repacked Q4_0, quant.repack_q4_0, where the VNNI
  kernels use it). The gate is packed only for predictor policies, which gather it with the rest; CATS /
  threshold policies compute the gate densely from the GGUF, and their packs leave it out (smaller on disk
  and in RAM). A gate and an up row both repacked Q4_0 are interleaved group by group (interleave_rows), so
  their paired dot reads one stream (from DRAM, against two rows 1152 bytes apart: 4.6% faster at kept
  fraction 0.5, 2% at 0.25, alike below).
- the down column in the format below.

GGUF stores ffn_down as (dim rows, n_ff cols), so a neuron's down weights are a strided column. At first
use it is dequantized, transposed and re-quantized per 32 values, at the precision of the source (PowerInfer's files
store it neuron-major as ffn_down_t: there F32, Q4_0 and Q8_0 columns are taken as they are, see down_columns):
- float32 for F32 models (exact);
- 4-bit (Q4_0's nibble order and rounding) for sources of 4 bits or fewer (Q4_0, Q4_K, Q3_K, Q2_K): as many
  quant bytes per neuron as a 4-bit original, so skipping neurons saves what it should;
- int8 for everything else (Q8_0, Q5_K, Q6_K, F16, BF16).
Quantized columns keep their quants first and then one fp16 scale per 32 values, as Q4_0 and Q8_0 do: a 4-bit
column has the source's bytes per neuron. (float32 scales, 3.6% more bytes a 2048-wide Q4_0 predictor unit,
were kept while the kernel's compute was exposed: fp16 measured 4-6% slower then. With the prefetch inside the
kernels, fp16 measured 1.4-7% faster at kept fraction 0.5 in five A/B runs in one process, within 2% at 0.25,
0.1 and 0.05 either way; the scales' rounding to fp16 is 2^-11 of a scale, far under the 4-bit steps.)
Re-quantizing adds error; tests/test_sparse.py measures it against the dense path and `sparserun bench`
reports the end-to-end fidelity.

Why one unit: a kept neuron's rows are read together, and random 1.2 KB rows stream from DRAM more slowly
than one 2.4 or 3.5 KB run (measured on 2 cores: 12.5 GB/s for random 1152-byte rows, 18 for 2304-byte
ones), and one parallel kernel replaces two or three.

Page-sized units: a unit whose padding to a multiple of 4096 bytes costs at most PAD_AT_MOST of its size
(the 3.5 KB units of a 2048-wide Q4_0 predictor pack) is padded, and the data starts on a page boundary,
so no unit straddles two pages (A/B from DRAM on random neuron sets, 2 threads: 14-15% faster at kept
fractions 0.1 and 0.25; one TLB entry and one DRAM page per unit). The padding is never read. The 3456-byte
unit of fp16 down scales pads by 18.5%: padded, it measured 6-10% faster at every kept fraction (A/B).

The packs are cached as .npy files (no pickle; the header padded so the data starts at byte 4096) under
$SPARSERUN_CACHE (default ~/.cache/sparserun), keyed by the model's tensor fingerprint, and read on the next
load into transparent huge pages (load_units; memory.py says why). Writing a pack removes that layer's packs of
the same kinds in older formats.
"""
import os
import struct
import weakref

import numpy as np

from .errors import SparserunError
from .kernels import quant as K
from .kernels import sparse as S
from .memory import huge_page_buffer

FOUR_BIT = (K.Q4_0, K.Q4_0R, K.Q4_K, K.Q4_KR, K.Q3_K, K.Q3_KR, K.Q2_K, K.Q2_KR)  # sources of 4 bits or fewer
PAGE = 4096
PAD_AT_MOST = 0.2  # padding a unit to whole pages is worth this much of its size
FORMAT = "p4"  # in the cache file names; older formats are not read: none (before page padding), "p" (gate and
# up rows apart), "p2" (float32 down scales), "p3" (repacked Q4_0 rows in Q4_0's byte order within a group)
DOWN_KINDS = {S.DOWN_F32: "f32", S.DOWN_Q4: "q4", S.DOWN_Q8: "q8"}


def cache_root():
    from .cache import root

    return root()


def down_kind(qtype):
    return S.DOWN_F32 if qtype == K.F32 else S.DOWN_Q4 if qtype in FOUR_BIT else S.DOWN_Q8


def unit_stride(used):
    """Bytes between units of `used` bytes: whole pages when that pads by at most PAD_AT_MOST, else used."""
    padded = -(-used // PAGE) * PAGE
    return padded if padded - used <= PAD_AT_MOST * used else used


def save_aligned(path, units):
    """units (n, stride) uint8 as a .npy file whose data starts at byte PAGE (np.load reads it as any .npy)."""
    header = repr({"descr": "|u1", "fortran_order": False, "shape": units.shape}).encode("latin1")
    pad = PAGE - 10 - len(header) - 1
    with open(path, "wb") as fh:
        fh.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header) + pad + 1) + header + b" " * pad + b"\n")
        fh.write(np.ascontiguousarray(units).data)


def down_columns(down, kind):
    """ffn_down (dim, n_ff) -> (n_ff, bytes) uint8: each neuron's column in the pack's down format. A down matrix
    stored neuron-major (weights.TransposedWeight: PowerInfer's ffn_down_t) in F32, Q8_0 or Q4_0 gives its columns
    as they are, only the bytes reordered (quants, then the fp16 scales): no re-quantization, no added error."""
    src = getattr(down, "source", None)  # the file's own rows (n_ff, dim), when it stores them neuron-major
    if src is not None:
        rows = src.raw.reshape(src.rows, src.row_bytes)
        if kind == S.DOWN_F32 and src.qtype == K.F32:
            return rows
        if (kind, src.qtype) in ((S.DOWN_Q4, K.Q4_0), (S.DOWN_Q8, K.Q8_0)):
            blocks = rows.reshape(src.rows, src.cols // K.QK, -1)  # (n_ff, dim/32, 2 + quant bytes): d, then quants
            return np.concatenate([blocks[:, :, 2:].reshape(src.rows, -1), blocks[:, :, :2].reshape(src.rows, -1)], 1)
    return quantize_columns(np.ascontiguousarray(down.dequantize().T), kind)  # from (n_ff, dim) float32


def quantize_columns(wt, kind):
    """Columns wt (n, dim) float32 -> (n, bytes) uint8 in a down format: float32 as they are, or per 32 values the
    quants, then one fp16 scale per 32 values (quantize_rows_q4 / quantize_rows_q8)."""
    if kind == S.DOWN_F32:
        return wt.view(np.uint8)
    s = np.empty((wt.shape[0], wt.shape[1] // K.QK), np.float32)  # (n_ff, dim/32), stored as fp16
    if kind == S.DOWN_Q4:
        q = np.empty((wt.shape[0], wt.shape[1] // 2), np.uint8)  # (n_ff, dim/2)
        S.quantize_rows_q4(wt, q, s)
    else:
        q = np.empty(wt.shape, np.int8)  # (n_ff, dim)
        S.quantize_rows_q8(wt, q, s)
    return np.concatenate([q.view(np.uint8), s.astype(np.float16).view(np.uint8)], axis=1)


def interleave_rows(gate, up):
    """Repacked Q4_0 rows gate and up (n, row_bytes) uint8 -> (n, 2 row_bytes): for each whole group of
    Q4_0R_GROUP blocks the gate's group, then the up row's; then the gate's shorter last group and the up
    row's (the order simd.dot_gate_up_q4_0r_vnni reads)."""
    n, rb = gate.shape
    gb = 18 * K.Q4_0R_GROUP
    head = rb // gb * gb  # the whole groups' bytes
    pairs = np.stack([gate[:, :head].reshape(n, -1, gb), up[:, :head].reshape(n, -1, gb)], axis=2).reshape(n, 2 * head)
    return np.concatenate([pairs, gate[:, head:], up[:, head:]], axis=1)


def remove_older_formats(path, stem):
    """Delete the cache files stem.*.npy other than path (the same layer and kinds in an older format; a
    concurrent writer's temporary files are left alone)."""
    folder = os.path.dirname(path)
    for name in os.listdir(folder):
        if name.startswith(stem + ".") and name.endswith(".npy") and os.path.join(folder, name) != path:
            try:
                os.remove(os.path.join(folder, name))
            except OSError:
                pass


def cached_units(path, stem, shape, build):
    """The units (shape (n, stride) uint8) cached at path, built first when absent: build() gives the (n, used) bytes,
    padded here to the stride, written atomically (a half-written cache file is never read), older formats of stem
    removed. Returns them as load_units does."""
    if not os.path.exists(path):
        units = np.zeros(shape, np.uint8)  # (n, stride)
        data = build()
        units[:, :data.shape[1]] = data
        tmp = path + f".tmp{os.getpid()}"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_aligned(tmp, units)
            os.replace(tmp, path)
        except OSError as e:
            if os.path.exists(tmp):  # e.g. a full disk: leave no partial file behind
                os.remove(tmp)
            raise SparserunError(f"cannot write the neuron-pack cache {path}: {e.strerror or e} "
                                 "(set $SPARSERUN_CACHE to a writable directory)") from None
        remove_older_formats(path, stem)
    return load_units(path, shape)


_LOADED = weakref.WeakValueDictionary()  # (path, file identity) -> units alive in this process (a bench's models)


def load_units(path, shape):
    """A pack cache file's units (shape (n, stride) uint8) as one flat array in transparent huge pages
    (memory.huge_page_buffer: the kernels read units at random, and 4 KiB pages cost them a TLB miss each;
    memory.py gives the figures). The file is read, not mapped: a file mapping gets no huge pages. A file already loaded in this
    process and still in use is shared, not read twice."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise SparserunError(f"{path}: unreadable neuron-pack cache ({e.strerror or e}); remove it to rebuild") from None
    key = (path, st.st_ino, st.st_size, st.st_mtime_ns)  # a rewritten file is read again
    units = _LOADED.get(key)
    if units is not None and units.size == shape[0] * shape[1]:
        return units
    try:
        with open(path, "rb") as fh:
            fmt = np.lib.format
            read_header = fmt.read_array_header_1_0 if fmt.read_magic(fh) == (1, 0) else fmt.read_array_header_2_0
            fshape, fortran, dtype = read_header(fh)
            if dtype != np.uint8 or fortran or tuple(fshape) != tuple(shape):
                raise SparserunError(f"{path}: stale neuron-pack cache (shape {fshape}, {dtype}); remove it to rebuild")
            units = huge_page_buffer(shape[0] * shape[1])
            if fh.readinto(memoryview(units)) != units.nbytes:
                raise SparserunError(f"{path}: truncated neuron-pack cache; remove it to rebuild")
    except (OSError, ValueError) as e:
        raise SparserunError(f"{path}: unreadable neuron-pack cache ({e}); remove it to rebuild") from None
    units.flags.writeable = False
    _LOADED[key] = units
    return units


class NeuronPack:
    """One layer's neuron-major units (gate row if given, up row, down column); run() computes one decode
    token's FFN over its kept neurons."""

    def __init__(self, gate, up, down, cache_dir, layer):
        self.dim, self.n_ff = down.rows, down.cols
        self.has_gate = gate is not None
        self.gate_qtype = gate.qtype if self.has_gate else up.qtype
        self.up_qtype = up.qtype
        self.kind = down_kind(down.qtype)
        self.interleaved = self.has_gate and gate.qtype == up.qtype == K.Q4_0R  # see pack_ffn
        gate_bytes = gate.row_bytes if self.has_gate else 0
        self.up_at = 18 * K.Q4_0R_GROUP if self.interleaved else gate_bytes
        self.down_at = gate_bytes + up.row_bytes
        used = self.down_at + S.down_bytes.py_func(self.kind, self.dim)
        stride = unit_stride(used)
        parts = ([gate.type_name] if self.has_gate else []) + [up.type_name, DOWN_KINDS[self.kind]]
        stem = f"pack.{layer}.{'-'.join(parts)}"
        path = os.path.join(cache_dir, f"{stem}.{FORMAT}.npy")
        def build():
            rows = [w.raw.reshape(w.rows, w.row_bytes) for w in ([gate] if self.has_gate else []) + [up]]
            if self.interleaved:
                rows = [interleave_rows(*rows)]
            return np.concatenate(rows + [down_columns(down, self.kind)], axis=1)

        self.unit_bytes, self.used = stride, used
        self.units = cached_units(path, stem, (self.n_ff, stride), build)  # (n_ff * stride,) uint8, in huge pages
        # pack_ffn's leading arguments: built once, as a decode token calls run() once per layer
        self._head = (self.units, stride, self.up_at, self.down_at, self.gate_qtype, self.up_qtype, K.HAS_VNNI,
                      self.kind, self.dim)

    def run(self, acts, idx, n, coef, mode, act_id, out):
        """out (dim,) = the FFN of one token over neurons idx[:n] (global ids); see kernels.sparse.pack_ffn."""
        if (mode == S.GATED_DOTS) != self.has_gate:
            raise ValueError("a neuron pack with gate rows runs GATED_DOTS only" if self.has_gate
                             else "this neuron pack holds no gate rows")
        S.pack_ffn(*self._head, idx, n, coef, mode, act_id, acts.x, part_sums(self.dim), out)
        return out

    def selected_args(self, w, gid, t, act_id, gated):
        """The arguments of kernels.sparse.select_pack_ffn before x, parts and out, for a threshold t: rows w (the
        gate if gated, else up; row r is neuron gid[r]) are computed densely and neuron r is kept when
        |act(w_r . x)| > t. Built once per layer, so a decode token's FFN is one kernel call."""
        if self.has_gate:
            raise ValueError("select_pack_ffn takes a pack without gate rows")
        return (w.raw, w.row_bytes, w.qtype, w.rows, gid, np.float32(t), act_id, gated, self.units, self.unit_bytes,
                self.down_at, self.up_qtype, K.HAS_VNNI, self.kind, self.dim)


_PARTS = {}


def part_sums(dim):
    """The pack kernels' partial-sum buffer (threads, dim) float32, one row per numba thread (at most
    kernels.sparse.MAX_PARTS), kept between calls: the kernels zero the rows they use. One buffer serves
    every layer and model: the kernels hold the GIL, so two never run at once."""
    import numba

    n = min(S.MAX_PARTS, numba.get_num_threads())
    buf = _PARTS.get((n, dim))
    if buf is None:
        buf = _PARTS[(n, dim)] = np.empty((n, dim), np.float32)
    return buf

