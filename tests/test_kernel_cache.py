"""The numba cache is cleared when any kernel source changes (numba itself only watches the defining file)."""
from sparserun import kernels


def test_stale_cache_is_cleared_and_current_one_kept(tmp_path):
    cached = [tmp_path / "quant.matmul_q4_0-1.py311.nbi", tmp_path / "quant.matmul_q4_0-1.py311.1.nbc",
              tmp_path / "ops.attention-9.py311.nbi"]
    other = tmp_path / "unrelated.f-1.py311.nbi"
    for f in cached + [other]:
        f.write_bytes(b"x")
    assert kernels.invalidate_stale_cache([str(tmp_path)], digest="old") == 3  # no stamp yet: stale
    assert not any(f.exists() for f in cached) and other.exists()
    cached[0].write_bytes(b"x")
    assert kernels.invalidate_stale_cache([str(tmp_path)], digest="old") == 0  # same sources: kept
    assert cached[0].exists()
    assert kernels.invalidate_stale_cache([str(tmp_path)], digest="new") == 1  # a source changed
    assert not cached[0].exists()


def test_digest_covers_every_kernel_source():
    import os

    assert {"simd/ir.py", "simd/legacy.py", "quant.py", "dequant.py", "ops.py", "sparse.py"} <= set(kernels.SOURCES)
    on_disk = {os.path.relpath(os.path.join(d, f), kernels.HERE) for d, _, fs in os.walk(kernels.HERE) for f in fs
               if f.endswith(".py")}
    assert set(kernels.SOURCES) == on_disk - {"__init__.py"}
    assert len(kernels.sources_digest()) == 64
