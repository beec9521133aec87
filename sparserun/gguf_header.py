"""A GGUF header parser that reads only what the engine needs: scalar metadata as Python values, numeric arrays
as numpy views, and string arrays (the tokenizer's 32k-262k pieces) skipped over and decoded only if asked for.

gguf.GGUFReader materialises every field as numpy objects: 10.5 s for Gemma 3's 262,144-token vocabulary, where
this parser takes a few tens of milliseconds (the tokenizer's arrays are llama-cpp-python's business).
Layout (gguf-py's constants.py, GGUF v2/v3): magic, version u32, tensor count u64, key/value count u64, the
key/values, the tensor infos (name, n_dims u32, dims u64[], type u32, offset u64), padding to
`general.alignment` (32 by default), then the tensor data. Little-endian only, as llama.cpp reads it.
"""
import struct

import numpy as np

# GGUF value types -> (struct code, size) of the scalar ones
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
STRING, ARRAY = 8, 9
MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
# "PWRI": PowerInfer's files, a GGUF whose magic its converter overwrites (powerinfer.py has the format's details)
MAGICS = (b"GGUF", b"PWRI")


class HeaderError(ValueError):
    """The header is malformed; the message says where."""


class StringArray:
    """A GGUF array of strings, decoded on first use (len() is free)."""

    def __init__(self, buf, offsets):
        self._buf, self._offsets = buf, offsets  # offsets: (count, 2) start/end of each string's bytes

    def __len__(self):
        return len(self._offsets)

    def __getitem__(self, i):
        a, b = self._offsets[i]
        return bytes(self._buf[a:b]).decode("utf-8", errors="replace")

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def tolist(self):
        return list(self)


class _Cursor:
    def __init__(self, buf):
        self.buf, self.at, self.size = buf, 0, len(buf)

    def take(self, n):
        if n < 0 or self.at + n > self.size:
            raise HeaderError(f"truncated header at byte {self.at} (needs {n} more)")
        a = self.at
        self.at += n
        return a

    def scalar(self, vtype):
        code, size = _SCALARS[vtype]
        return struct.unpack_from(code, self.buf, self.take(size))[0]

    def string(self):
        n = self.scalar(10)
        a = self.take(n)
        return bytes(self.buf[a:a + n]).decode("utf-8", errors="replace")

    def value(self, vtype, depth=0):
        if vtype in _SCALARS:
            return self.scalar(vtype)
        if vtype == STRING:
            return self.string()
        if vtype != ARRAY or depth:
            raise HeaderError(f"unknown value type {vtype} at byte {self.at}")
        itype, count = self.scalar(4), self.scalar(10)
        if itype in _NUMPY:
            size = _SCALARS[itype][1]
            if count > (self.size - self.at) // size:
                raise HeaderError(f"array of {count} values runs past the end of the file")
            a = self.take(count * size)
            return np.frombuffer(self.buf, _NUMPY[itype], count, a)
        if itype == STRING:
            if count > (self.size - self.at) // 8:
                raise HeaderError(f"array of {count} strings runs past the end of the file")
            offsets = np.empty((count, 2), np.int64)
            unpack, buf = struct.Struct("<Q").unpack_from, self.buf
            for i in range(count):  # strings are length-prefixed: walk them, decode none
                n = unpack(buf, self.take(8))[0]
                offsets[i, 0] = self.take(n)
                offsets[i, 1] = offsets[i, 0] + n
            return StringArray(buf, offsets)
        if itype == ARRAY:  # nested arrays: skipped as llama.cpp skips them (no key the engine reads uses one)
            return [self.value(ARRAY, 0) for _ in range(count)]
        raise HeaderError(f"unknown array item type {itype} at byte {self.at}")


def parse(buf, meta_end=None):
    """(version, metadata dict, [(name, ggml type, dims (ne order), offset from the data start)], data start)
    of the GGUF (or PWRI) bytes buf (a memoryview or mmap). Raises HeaderError on anything malformed. meta_end: a
    list that receives the byte offset where the key/values end."""
    meta_end = [] if meta_end is None else meta_end
    c = _Cursor(buf)
    if bytes(buf[:4]) not in MAGICS:
        raise HeaderError("bad magic bytes")
    c.take(4)
    version = c.scalar(4)
    if version not in (2, 3):
        raise HeaderError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = c.scalar(10), c.scalar(10)
    if n_tensors > c.size // 24 or n_kv > c.size // 12:
        raise HeaderError(f"implausible counts ({n_tensors} tensors, {n_kv} keys) for a file of {c.size} bytes")
    meta = {}
    for _ in range(n_kv):
        key = c.string()
        meta[key] = c.value(c.scalar(4))
    meta_end[:] = [c.at]
    tensors = []
    for _ in range(n_tensors):
        name = c.string()
        n_dims = c.scalar(4)
        if not 1 <= n_dims <= MAX_DIMS:
            raise HeaderError(f"tensor {name!r} has {n_dims} dimensions")
        dims = [c.scalar(10) for _ in range(n_dims)]
        tensors.append((name, c.scalar(4), dims, c.scalar(10)))
    align = meta.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise HeaderError(f"general.alignment {align!r} is not a power of two")
    start = -(-c.at // align) * align
    return version, meta, tensors, start


def metadata_only(buf, arch=None):
    """The GGUF of buf's key/values alone, no tensors, with the GGUF magic: what llama.cpp's vocab_only load reads
    (a PowerInfer file's tokenizer, which llama.cpp cannot open under its PWRI magic). arch: rename the architecture
    (general.architecture and every `<arch>.` key) to one llama.cpp knows."""
    _, meta, _, _ = parse(buf)
    old = meta.get("general.architecture")
    c = _Cursor(buf)
    c.take(4)
    version = c.scalar(4)
    c.scalar(10)
    n_kv = c.scalar(10)
    out = [b"GGUF", struct.pack("<IQQ", version, 0, n_kv)]
    enc = lambda text: struct.pack("<Q", len(text.encode())) + text.encode()  # noqa: E731
    for _ in range(n_kv):
        key = c.string()
        vtype = c.scalar(4)
        a = c.at
        c.value(vtype)
        value = bytes(buf[a:c.at])
        if arch and key == "general.architecture":
            value = enc(arch)
        elif arch and old and key.startswith(old + "."):
            key = arch + key[len(old):]
        out.append(enc(key) + struct.pack("<I", vtype) + value)
    return b"".join(out)
