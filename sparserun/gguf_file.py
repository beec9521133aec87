"""Open and validate a GGUF file: metadata as Python values, tensors as raw byte views of the memory map.

Everything a kernel will touch is checked here (tensor extents inside the file, block-aligned shapes,
known types), so a bad file becomes a ModelFileError naming the file and the problem, never a crash
inside a JIT kernel.
"""
import mmap
import os
from dataclasses import dataclass

import numpy as np

from . import gguf_header
from .errors import ModelFileError
from .qtypes import BLOCKS, TYPES, type_name as _type_name

GGUF_MAGIC, POWERINFER_MAGIC = gguf_header.MAGICS


@dataclass
class RawTensor:
    """One 2-D (or 1-D) tensor as stored: rows of `cols` values of ggml type `qtype`, row r at raw[r*row_bytes:]."""

    name: str
    qtype: int
    rows: int
    cols: int
    raw: np.ndarray  # uint8 (rows * row_bytes,), a view into the file's memory map
    row_bytes: int

    @property
    def type_name(self):
        return _type_name(self.qtype)

    @property
    def n_bytes(self):
        return self.raw.nbytes


class GGUFFile:
    """A validated, memory-mapped GGUF file. The header is parsed by gguf_header (string arrays such as the
    vocabulary are skipped, not decoded); tensors are checked when first asked for."""

    def __init__(self, path):
        self.path = str(path)
        if not os.path.exists(self.path):
            raise ModelFileError(self.path, "no such file")
        if os.path.isdir(self.path):
            raise ModelFileError(self.path, "is a directory, not a GGUF file")
        with open(self.path, "rb") as fh:
            magic = fh.read(4)
            if magic not in gguf_header.MAGICS:
                raise ModelFileError(self.path, "not a GGUF file (bad magic bytes)")
            self.powerinfer = magic == POWERINFER_MAGIC  # PowerInfer's PWRI file (powerinfer.py)
            try:
                self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as e:
                raise ModelFileError(self.path, f"cannot map the file ({e})") from None
        self.file_size = len(self._mmap)
        try:
            self.version, self.metadata, infos, data_start = gguf_header.parse(memoryview(self._mmap))
        except gguf_header.HeaderError as e:
            raise ModelFileError(self.path, f"corrupted or truncated GGUF ({e})") from None
        # name -> (ggml type id, ggml shape ne[], absolute byte offset)
        self._tensors = {}
        for name, qtype, ne, off in infos:
            if name in self._tensors:
                raise ModelFileError(self.path, f"corrupted GGUF: tensor {name!r} appears twice")
            self._tensors[name] = (int(qtype), [int(x) for x in ne], data_start + int(off))
        self._data = np.frombuffer(self._mmap, np.uint8)  # readonly view of the mapping (numba takes it)

    def release_pages(self, view):
        """Unmap from this process the file's pages under `view` (a RawTensor's raw bytes). They stay in the page
        cache and are mapped again if read again: after the loader copies a weight, the RSS counts the copy, not
        both (and, released one weight at a time, never both at once)."""
        from .memory import discard

        discard(view, inner=False)  # pages shared with a neighbouring tensor are mapped again if read

    # ---- metadata ----
    def get(self, key, default=None):
        return self.metadata.get(key, default)

    def require(self, key):
        if key not in self.metadata:
            raise ModelFileError(self.path, f"missing metadata key {key!r}")
        return self.metadata[key]

    @property
    def architecture(self):
        return self.require("general.architecture")

    # ---- tensors ----
    def has(self, name):
        return name in self._tensors

    @property
    def tensor_names(self):
        return list(self._tensors)

    def dims(self, name):
        """Tensor name's dimensions as stored (ggml order: ne[0] is the row length)."""
        return list(self._tensors[name][1])

    def tensor_types(self):
        return {name: _type_name(t[0]) for name, t in self._tensors.items()}

    def tensor(self, name, shape=None):
        """The tensor `name` as a RawTensor, checked against the expected (rows, cols) `shape` if given."""
        t = self._tensors.get(name)
        if t is None:
            raise ModelFileError(self.path, f"missing tensor {name!r}")
        qtype, ne, start = t
        if qtype not in BLOCKS:
            raise ModelFileError(self.path, f"tensor {name!r} has unsupported type {_type_name(qtype)} "
                                 f"(supported: {', '.join(t.name for t in TYPES.values())})")
        if any(d <= 0 for d in ne):
            raise ModelFileError(self.path, f"tensor {name!r} has an empty dimension {ne}")
        cols = ne[0]  # ggml order: ne[0] is the contiguous (column) dimension
        rows = int(np.prod(ne[1:])) if len(ne) > 1 else 1
        block, block_bytes = BLOCKS[qtype]
        if cols % block:
            raise ModelFileError(self.path, f"tensor {name!r}: row length {cols} is not a multiple of {_type_name(qtype)}'s block of {block}")
        row_bytes = cols // block * block_bytes
        n_bytes = rows * row_bytes
        if start + n_bytes > self.file_size:
            raise ModelFileError(self.path, f"truncated: tensor {name!r} ends at byte {start + n_bytes} but the file has {self.file_size}")
        if shape is not None and (rows, cols) != tuple(shape):
            raise ModelFileError(self.path, f"tensor {name!r} has shape {(rows, cols)}, expected {tuple(shape)}")
        return RawTensor(name, qtype, rows, cols, self._data[start:start + n_bytes], row_bytes)

    def fingerprint(self):
        """Hex digest identifying this model's tensors: the tensor table (names, types, shapes) and the
        first and last 4 KiB of every tensor's data. Profiles, predictors and caches are bound to it."""
        import hashlib

        h = hashlib.sha256()
        for name, (qtype, ne, start) in sorted(self._tensors.items()):
            h.update(f"{name}|{qtype}|{ne}".encode())
            t = self.tensor(name)
            h.update(t.raw[:4096].tobytes())
            h.update(t.raw[-4096:].tobytes())
        return h.hexdigest()

    def n_params(self):
        return sum(int(np.prod(t[1])) for t in self._tensors.values())


def write_side_file(path, arch, values, tensors):
    """Write one of the project's own files (profile, predictors): a GGUF with architecture `arch`,
    string / int / float keys `values` and float32 `tensors` (numpy-shaped)."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch)
    for key, v in values.items():
        if isinstance(v, str):
            w.add_string(key, v)
        elif isinstance(v, int):
            w.add_uint64(key, v)
        else:
            w.add_float32(key, float(v))
    for name, a in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(a, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def read_side_file(path, arch):
    """(metadata dict, float32 tensors in numpy shape) of a file written by write_side_file. Raises on a
    file that is not a GGUF of architecture `arch`; callers turn that into their one-line error."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    meta = {k: f.contents() for k, f in reader.fields.items()}
    if meta.get("general.architecture") != arch:
        raise ValueError(f"architecture is {meta.get('general.architecture')!r}, not {arch!r}")
    tensors = {t.name: np.array(t.data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
               for t in reader.tensors}
    bad = next((name for name, a in tensors.items() if not np.isfinite(a).all()), None)
    if bad is not None:  # a damaged file: refused before any value is cast or used
        raise ValueError(f"tensor {bad!r} holds non-finite values")
    return meta, tensors
