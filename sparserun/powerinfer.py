"""PowerInfer's own files: PWRI models with their activation predictors, and their GPU index (`*.gpuidx`).

What the format is, from PowerInfer's converter (convert-hf-to-powerinfer-gguf.py), loader (llama.cpp) and
ggml.c (SJTU-IPADS/PowerInfer):
- A model file is a GGUF whose first four bytes the converter overwrites with "PWRI"; the rest is GGUF v3.
  Its llama (and bamboo) graph then runs the sparse FFN (llm_build_ffn_sparse) with ReLU: relu(gate) * up for
  llama (LLM_FFN_PAR), relu(gate) * relu(up) for bamboo (LLM_FFN_SYM).
- ffn_down is stored transposed as blk.N.ffn_down_t.weight, ggml shape {n_embd, n_ff}: row j is neuron j's
  down column (PowerInfer's axpy reads it so; so do sparserun's neuron packs).
- Per layer the predictor, a Linear -> ReLU -> Linear MLP without biases: blk.N.fc1.weight {n_embd, r} and
  blk.N.fc2.weight {r, n_ff} (r may differ per layer), in the file's type (F16 from the converter; its quantizer
  writes Q4_0 for a Q4_0 file and Q5_0 otherwise). Its input is the FFN's residual input before ffn_norm
  (llm_build_ffn_sparse's pred_inpl is ffn_inp in build_llama_variants), and neuron j is computed unless its
  score is below `powerinfer.sparse_threshold` (ggml_compute_forward_mul_mat_sparse: `if (idx[j] < threshold)`
  skips), so score >= threshold keeps it; without the key the threshold is 0.
- The GPU index is another PWRI GGUF, architecture "generic.gpu_index", key split.vram_capacity (u64), and per
  layer, in this order, blk.N.gpu_idx (n_ff int32 of 0/1: on the GPU or not) and blk.N.gpu_bucket (the sorted ids
  of the GPU's neurons). Its int32 tensors carry ggml type 18, PowerInfer's GGML_TYPE_I32 (its ggml.h enum ends
  I8 = 16, I16 = 17, I32 = 18; upstream ggml later renumbered them).
Not certain from the source, and so not relied on: whether a file may hold both ffn_down and ffn_down_t (the
converter writes only the latter; if both are present this reads ffn_down_t), and the layout of gpuidx files with a
layer whose bucket is empty (the writer would add a zero-length tensor; this reader accepts one).
"""
import struct
import time

import numpy as np

from .errors import ModelFileError, SparserunError

MAGIC = b"PWRI"
KEY_THRESHOLD = "powerinfer.sparse_threshold"
INDEX_ARCH = "generic.gpu_index"
KEY_VRAM = "split.vram_capacity"
I32 = 18  # PowerInfer's GGML_TYPE_I32


def switches(f):
    """ModelArgs overrides for a llama-family file in PowerInfer's format (arch modules llama and bamboo)."""
    if not f.powerinfer:
        return {}
    out = {"activation": "relu"}
    if f.has("blk.0.ffn_down_t.weight"):
        out["down_t"] = True
    return out


def has_predictors(f):
    return f.powerinfer and f.has("blk.0.fc1.weight")


def file_threshold(f):
    t = f.get(KEY_THRESHOLD, 0.0)
    if not isinstance(t, (int, float)) or not np.isfinite(t):
        raise ModelFileError(f.path, f"{KEY_THRESHOLD} is {t!r}, not a finite number")
    return float(t)


COLUMN_TYPES = (2, 6, 8)  # Q4_0, Q5_0, Q8_0: values d * integer with one fp16 d first in each 32-block


class PowerInferPredictor:
    """The file's own predictors, run as PowerInfer runs them: score = fc2 relu(fc1 x) on the FFN's residual input x,
    neuron j kept where score_j >= threshold.

    A decode token's scores come from one kernel (kernels.sparse.predict_active_cols): fc1 in the file's type, dotted
    as every matmul (x rounded to int8 blocks for quantized rows, as ggml's mul_mat rounds it); fc2, whose rows are
    only r long, laid out transposed at load as int8 values with each 32-block's scale: exact for Q4_0 / Q5_0 /
    Q8_0 predictors (PowerInfer's quantizer writes those), and so fc2's stage is r vectorized axpys. Prompt batches,
    and predictors of other types (F16, the converter's default; F32), run the engine's two matmuls (scores)."""

    def __init__(self, model, threshold=None):
        from .weights import Weight

        f, a = model.gguf, model.args
        if not has_predictors(f):
            raise SparserunError(f"{model.path}: no PowerInfer predictors in this file (blk.N.fc1 / fc2: a PWRI model "
                                 "has them; for other models use predictor:FILE from `sparserun train-predictors`)")
        self.threshold = file_threshold(f) if threshold is None else float(threshold)
        self.layers, self.columns = [], []
        for i in range(a.n_layer):
            fc1 = f.tensor(f"blk.{i}.fc1.weight")
            fc2 = f.tensor(f"blk.{i}.fc2.weight")
            if fc1.cols != a.dim or fc2.rows != a.n_ff or fc2.cols != fc1.rows:
                raise ModelFileError(f.path, f"predictor of layer {i}: fc1 {fc1.rows}x{fc1.cols} and fc2 "
                                             f"{fc2.rows}x{fc2.cols} do not chain {a.dim} -> r -> {a.n_ff}")
            self.layers.append((Weight(fc1).in_memory(), Weight(fc2).in_memory()))
            self.columns.append(_columns(f.path, fc2) if fc2.qtype in COLUMN_TYPES else None)
        self.rank = [w1.rows for w1, _ in self.layers]
        self.idx = np.empty(a.n_ff, np.int64)
        self.seconds = 0.0

    def scores(self, li, x):
        """(T, n_ff) predictor outputs for residual inputs x (T, dim), by the engine's matmuls."""
        from .weights import Acts

        w1, w2 = self.layers[li]
        h = w1.matmul(Acts(np.ascontiguousarray(x, np.float32)))  # (T, r)
        np.maximum(h, 0.0, out=h)
        return w2.matmul(Acts(h))  # (T, n_ff)

    def __call__(self, li, acts):
        import numba

        from .kernels import quant as K
        from .kernels import sparse as S

        t0 = time.perf_counter()
        x = acts.residual
        if x is None:
            raise SparserunError("PowerInfer's predictors read the FFN's residual input, which this caller did not pass")
        cols = self.columns[li]
        if len(x) == 1 and cols is not None:  # a decode token: one kernel
            w1 = self.layers[li][0]
            n = S.predict_active_cols(np.ascontiguousarray(x, np.float32), w1.raw, w1.row_bytes, w1.qtype, K.HAS_VNNI,
                                      *cols, np.float32(self.threshold), self.idx, 2 * numba.get_num_threads())
            out = [self.idx[:n].copy()]
        else:
            out = [np.flatnonzero(row >= self.threshold) for row in self.scores(li, x)]
        self.seconds += time.perf_counter() - t0
        return out


def _columns(path, t):
    """fc2 (n_ff, r) of a COLUMN_TYPES type as (q (r, n_ff) int8, d (r/32, n_ff) float32) with q * d its values
    exactly: each block's fp16 scale read from the block's first two bytes, the integers from the dequantized values."""
    from .weights import Weight

    nb = t.cols // 32
    d = t.raw.reshape(t.rows, nb, -1)[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float32)  # (n_ff, nb)
    v = Weight(t).dequantize().reshape(t.rows, nb, 32)
    q = np.rint(np.divide(v, d[:, :, None], out=np.zeros_like(v), where=d[:, :, None] != 0))
    if not np.array_equal(q * d[:, :, None], v):  # a non-finite scale: garbage, refused before any kernel reads it
        raise ModelFileError(path, f"tensor {t.name!r} holds non-finite block scales")
    return np.ascontiguousarray(q.reshape(t.rows, -1).T.astype(np.int8)), np.ascontiguousarray(d.T)


# ---- the GPU index ----

def is_gpu_index(path):
    """Whether path is a PWRI file (a GPU index given as --placement; read_gpu_index refuses a PWRI model file)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == MAGIC
    except OSError:
        return False


def read_gpu_index(path, model):
    """A hybrid.Placement from PowerInfer's GPU index: per layer the neurons of gpu_bucket on the GPU (attention and
    the head stay on the CPU: PowerInfer's index places FFN neurons only). The file carries no fingerprint, so it is
    checked against the model by shape: one gpu_idx of n_ff entries and one gpu_bucket per layer, the bucket the
    sorted ids of gpu_idx's ones."""
    import mmap

    from . import gguf_header
    from .placement import Placement

    a = model.args

    def bad(why):
        return SparserunError(f"{path}: not a GPU index for {model.path} ({why})")

    try:
        with open(path, "rb") as fh:
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        _, meta, infos, start = gguf_header.parse(memoryview(buf))
    except (OSError, ValueError) as e:
        raise SparserunError(f"{path}: unreadable GPU index ({e})") from None
    if bytes(buf[:4]) != MAGIC or meta.get("general.architecture") != INDEX_ARCH:
        raise bad(f"architecture {meta.get('general.architecture')!r}, expected a PWRI {INDEX_ARCH!r} file")
    tensors = {}
    for name, qtype, ne, off in infos:
        n = int(np.prod(ne)) if ne else 0
        if qtype != I32 or len(ne) != 1 or start + off + 4 * n > len(buf):
            raise bad(f"tensor {name!r} is not a whole int32 vector")
        tensors[name] = np.frombuffer(buf, np.int32, n, start + off).astype(np.int64)
    if len(tensors) != 2 * a.n_layer:
        raise bad(f"{len(tensors) // 2} layers, the model has {a.n_layer}")
    gpu = []
    for li in range(a.n_layer):
        mask, bucket = tensors.get(f"blk.{li}.gpu_idx"), tensors.get(f"blk.{li}.gpu_bucket")
        if mask is None or bucket is None:
            raise bad(f"layer {li} has no gpu_idx / gpu_bucket")
        if len(mask) != a.n_ff or not np.isin(mask, (0, 1)).all():
            raise bad(f"layer {li}: gpu_idx of {len(mask)} entries, the model has {a.n_ff} neurons")
        if not np.array_equal(bucket, np.flatnonzero(mask)):
            raise bad(f"layer {li}: gpu_bucket is not the sorted ids of gpu_idx's ones")
        gpu.append(bucket)
    from .placement import device_neuron_bytes

    used = sum(len(g) * device_neuron_bytes(L, a.dim) for g, L in zip(gpu, model.layers))
    return Placement(model.gguf.fingerprint(), int(meta.get(KEY_VRAM, used)), used, gpu, np.zeros(a.n_layer, bool), False)


def _str(text):
    b = text.encode()
    return struct.pack("<Q", len(b)) + b


def _kv(key, vtype, packed):
    """One GGUF key/value: key, value type (gguf_header's numbering), the packed value."""
    return _str(key) + struct.pack("<I", vtype) + packed


def write_pwri(path, kvs, n_kv, tensors):
    """Write a PWRI file: GGUF v3 under PowerInfer's magic (written here, not with gguf-py: a model's key/values are
    copied as bytes, and gguf-py's type 18 is no longer PowerInfer's I32). kvs: the packed key/values (n_kv of
    them); tensors: (name, ne (ggml order), ggml type, uint8 data) in file order, each padded to 32 bytes."""
    tensors = [(name, ne, qtype, np.ascontiguousarray(data).reshape(-1).view(np.uint8)) for name, ne, qtype, data in tensors]
    info, off = b"", 0
    for name, ne, qtype, data in tensors:
        info += _str(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        info += struct.pack("<IQ", qtype, off)
        off += -(-len(data) // 32) * 32
    head = MAGIC + struct.pack("<IQQ", 3, len(tensors), n_kv) + kvs + info
    with open(path, "wb") as fh:
        fh.write(head + b"\0" * (-len(head) % 32))
        for _, _, _, data in tensors:
            fh.write(memoryview(data))
            fh.write(b"\0" * (-len(data) % 32))


def write_gpu_index(path, gpu_neurons, n_ff, vram_bytes=0):
    """Write PowerInfer's GPU index for per-layer GPU neuron ids, as its export_split does."""
    kvs = [_kv("general.architecture", 8, _str(INDEX_ARCH)), _kv("general.alignment", 4, struct.pack("<I", 32)),
           _kv(INDEX_ARCH + ".block_count", 4, struct.pack("<I", len(gpu_neurons))),
           _kv(KEY_VRAM, 10, struct.pack("<Q", int(vram_bytes)))]
    tensors = []
    for li, ids in enumerate(gpu_neurons):
        ids = np.sort(np.asarray(ids, np.int64))
        mask = np.zeros(n_ff, "<i4")
        mask[ids] = 1
        tensors += [(f"blk.{li}.gpu_idx", [n_ff], I32, mask.view(np.uint8)),
                    (f"blk.{li}.gpu_bucket", [len(ids)], I32, ids.astype("<i4").view(np.uint8))]
    write_pwri(path, b"".join(kvs), len(kvs), tensors)


MAX_SCALE = 1e4  # the largest factor fc2 is scaled by when a layer's threshold is folded into the file's one


def fold_thresholds(thresholds):
    """(one threshold T, per-layer fc2 scale s) with s * score >= T wherever score >= t_l for PowerInfer's single
    threshold: T = -1 when any t_l < 0 (s = 1/|t_l|), +1 when all are >= 0 and some > 0, 0 when all are 0. A layer
    whose t_l has the other sign (or a tiny |t_l|) gets s = MAX_SCALE: its effective threshold moves toward 0 by at
    most 1/MAX_SCALE, only in the direction that keeps more neurons (recall never falls)."""
    t = np.asarray(thresholds, np.float64)
    T = -1.0 if (t < 0).any() else (1.0 if (t > 0).any() else 0.0)
    if T == 0.0:
        return T, np.ones(len(t))
    same = np.sign(t) == np.sign(T)
    s = np.where(same, 1.0 / np.maximum(np.abs(t), 1.0 / MAX_SCALE), MAX_SCALE)
    return T, s


def export(model, pset, out):
    """Write model (a plain GGUF, llama or bamboo with a ReLU FFN) with predictors pset (trained in PowerInfer's form,
    `sparserun train-predictors --form powerinfer`) as a PWRI file: every tensor as it is, ffn_down transposed into
    ffn_down_t (re-quantized in its own type where gguf-py can write it, else F16), fc1 / fc2 in F16 as PowerInfer's
    converter writes them, the per-layer thresholds folded into powerinfer.sparse_threshold (fold_thresholds).
    Returns (threshold, effective per-layer thresholds)."""
    from gguf import GGMLQuantizationType, quants

    from .weights import Weight

    f, a = model.gguf, model.args
    if f.powerinfer:
        raise SparserunError(f"{model.path} is already a PowerInfer (PWRI) file")
    if a.arch not in ("llama", "bamboo") or a.activation not in ("relu", "relu_sym") or not a.gated:
        raise SparserunError(f"{model.path}: PowerInfer runs gated ReLU llama and bamboo models; this is {a.arch} with "
                             f"a {a.activation} FFN")
    if pset.input != "residual":
        raise SparserunError("these predictors read the FFN's normalized input; PowerInfer's read the residual stream: "
                             "train them with `sparserun train-predictors --form powerinfer`")
    T, scale = fold_thresholds([p.threshold for p in pset.layers])
    meta = _metadata_only(f.path)
    n_kv = struct.unpack_from("<Q", meta, 16)[0] + 1
    kvs = meta[24:] + _kv(KEY_THRESHOLD, 6, struct.pack("<f", T))
    tensors = []
    for name in f.tensor_names:
        t = f.tensor(name)
        if name.endswith(".ffn_down.weight"):
            wt = np.ascontiguousarray(Weight(t).dequantize().T)  # (n_ff, dim)
            name, qtype = name.replace("ffn_down", "ffn_down_t"), t.qtype
            try:
                data = quants.quantize(wt, GGMLQuantizationType(qtype)) if qtype else wt
            except (NotImplementedError, ValueError):
                data, qtype = wt.astype(np.float16), int(GGMLQuantizationType.F16)
            tensors.append((name, [a.dim, a.n_ff], qtype, np.ascontiguousarray(data).view(np.uint8)))
            continue
        tensors.append((name, f.dims(name), t.qtype, t.raw))
    for i, (p, s) in enumerate(zip(pset.layers, scale)):
        fc1 = np.ascontiguousarray(p.w1.T).astype(np.float16)  # (r, dim)
        fc2 = np.ascontiguousarray(p.w2.T * np.float32(s)).astype(np.float16)  # (n_ff, r)
        tensors.append((f"blk.{i}.fc1.weight", [a.dim, fc1.shape[0]], 1, fc1.view(np.uint8)))
        tensors.append((f"blk.{i}.fc2.weight", [fc2.shape[1], a.n_ff], 1, fc2.view(np.uint8)))
    write_pwri(out, kvs, n_kv, tensors)
    return T, [T / x if T else 0.0 for x in scale]


def vocab_path(path):
    """A path llama.cpp can read path's vocabulary from: path itself, or for a PWRI or bamboo file its key/values as a
    llama GGUF of no tensors, written once into the cache (llama.cpp refuses the PWRI magic and knows no bamboo)."""
    import hashlib
    import os

    from .cache import root

    with open(path, "rb") as fh:
        if fh.read(4) != MAGIC and b"bamboo" not in fh.read(4096):  # general.architecture comes first
            return path
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:32]
    out = os.path.join(root(), "vocab", key + ".gguf")
    if not os.path.exists(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        tmp = f"{out}.tmp{os.getpid()}"
        with open(tmp, "wb") as o:
            o.write(_metadata_only(path, "llama"))  # bamboo is llama's vocabulary
        os.replace(tmp, out)
    return out


def _metadata_only(path, arch=None):
    """gguf_header.metadata_only of the file at path (read through a memory map, released before it closes)."""
    import mmap

    from . import gguf_header

    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        view = memoryview(buf)
        try:
            return gguf_header.metadata_only(view, arch)
        finally:
            view.release()


def mark_powerinfer(path):
    """Turn a GGUF written by gguf-py into a PWRI file, as PowerInfer's converter does: overwrite the magic."""
    with open(path, "r+b") as fh:
        fh.write(MAGIC)
