"""The weight types the engine reads, one record each: ggml's type id and name, block geometry, and the family
whose kernels read it (numba-free: opening a file checks tensors against this table without importing a kernel).

The kernels key their tables by these ids (kernels/quant.py: dequantizers and matmul routes). Adding a type is a
record here plus its dequantizer (and, for speed, its dot) in the kernel family named by `family`.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class QType:
    id: int  # ggml type id (gguf.GGMLQuantizationType)
    name: str
    block: int  # values per block
    block_bytes: int  # bytes per block
    family: str  # "float", "legacy" (32-value blocks), "k" (256-value super-blocks), "iq" (non-linear codebooks)

    def row_bytes(self, cols):
        return cols // self.block * self.block_bytes


_RECORDS = [
    QType(0, "F32", 1, 4, "float"),
    QType(1, "F16", 1, 2, "float"),
    QType(30, "BF16", 1, 2, "float"),
    QType(2, "Q4_0", 32, 18, "legacy"),
    QType(3, "Q4_1", 32, 20, "legacy"),
    QType(6, "Q5_0", 32, 22, "legacy"),
    QType(7, "Q5_1", 32, 24, "legacy"),
    QType(8, "Q8_0", 32, 34, "legacy"),
    QType(10, "Q2_K", 256, 84, "k"),
    QType(11, "Q3_K", 256, 110, "k"),
    QType(12, "Q4_K", 256, 144, "k"),
    QType(13, "Q5_K", 256, 176, "k"),
    QType(14, "Q6_K", 256, 210, "k"),
    QType(20, "IQ4_NL", 32, 18, "iq"),
    QType(23, "IQ4_XS", 256, 136, "iq"),
]
TYPES = {t.id: t for t in _RECORDS}
BY_NAME = {t.name: t for t in _RECORDS}
BLOCKS = {t.id: (t.block, t.block_bytes) for t in _RECORDS}  # type id -> (values per block, bytes per block)

F32, F16, BF16 = 0, 1, 30
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K = 10, 11, 12, 13, 14
IQ4_NL, IQ4_XS = 20, 23
# Not ggml types: rows repacked at load for the integer dots (kernels/quant.repack_q4_0, kernels/krepack.py), the
# same bytes per row as the file's type
Q4_0R, Q4_KR, Q5_KR, Q6_KR, Q3_KR, Q2_KR, IQ4_XSR, IQ4_NLR = 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1009
REPACKED_NAMES = {Q4_0R: "Q4_0R", Q4_KR: "Q4_KR", Q5_KR: "Q5_KR", Q6_KR: "Q6_KR", Q3_KR: "Q3_KR", Q2_KR: "Q2_KR",
                  IQ4_XSR: "IQ4_XSR", IQ4_NLR: "IQ4_NLR"}


def type_name(qtype):
    """ggml's name of a type id, also for ids the engine does not read."""
    if qtype in TYPES:
        return TYPES[qtype].name
    if qtype in REPACKED_NAMES:
        return REPACKED_NAMES[qtype]
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(qtype).name
    except (ValueError, ImportError):
        return f"type {qtype}"
