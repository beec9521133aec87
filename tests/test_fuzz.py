"""Mutated GGUF files (header counts, metadata bytes, tensor types, dims and offsets, truncation, noise in the
weights): each one either runs or is refused with a SparserunError (one line in the CLI), never another exception,
a crash or a hang. Weights holding NaN or Inf are refused with the layer named, or by --check-tensors at load."""
import struct
import time

import numpy as np
import pytest

import sparserun
from sparserun import gguf_header
from sparserun.errors import SparserunError


def tensor_info_offsets(data):
    """name -> byte offset of its tensor info's n_dims field in the header."""
    _, _, infos, _ = gguf_header.parse(memoryview(data))
    out = {}
    for name, *_ in infos:
        key = struct.pack("<Q", len(name)) + name.encode()
        out[name] = data.index(key) + len(key)
    return out


def mutations(data, rng, n):
    """n mutated copies of data, a spread over the kinds above."""
    infos = tensor_info_offsets(data)
    names = sorted(infos)
    _, _, tensors, start = gguf_header.parse(memoryview(data))
    header_end = start
    for i in range(n):
        d = bytearray(data)
        kind = i % 7
        if kind == 0:  # header counts
            at = 8 + 8 * int(rng.integers(0, 2))
            d[at:at + 8] = struct.pack("<Q", int(rng.choice([0, 1, 3, 2**31, 2**62, rng.integers(0, 500)])))
        elif kind == 1:  # metadata bytes
            for at in rng.integers(24, infos[names[0]] - 8, 4):
                d[at] = rng.integers(0, 256)
        elif kind == 2:  # a tensor's type id
            at = infos[names[rng.integers(len(names))]]
            n_dims = struct.unpack_from("<I", d, at)[0]
            at += 4 + 8 * n_dims
            d[at:at + 4] = struct.pack("<I", int(rng.choice([2, 8, 12, 14, 6, 99, 2**31, rng.integers(0, 40)])))
        elif kind == 3:  # a dim or the dim count
            at = infos[names[rng.integers(len(names))]]
            if rng.random() < 0.3:
                d[at:at + 4] = struct.pack("<I", int(rng.integers(0, 9)))
            else:
                d[at + 4:at + 12] = struct.pack("<Q", int(rng.choice([0, 1, 7, 64, 2**20, 2**40, rng.integers(0, 1000)])))
        elif kind == 4:  # a data offset
            at = infos[names[rng.integers(len(names))]]
            n_dims = struct.unpack_from("<I", d, at)[0]
            at += 8 + 8 * n_dims
            d[at:at + 8] = struct.pack("<Q", int(rng.choice([0, 1, 2**40, rng.integers(0, len(data))])))
        elif kind == 5:  # truncation
            d = d[:int(rng.integers(0, len(data)))]
        else:  # noise in the weights
            for at in rng.integers(header_end, len(data), 64):
                d[at] = rng.integers(0, 256)
        yield kind, bytes(d)


def test_mutated_files_run_or_are_refused_in_one_line(stories, tmp_path):
    data = stories.read_bytes()
    rng = np.random.default_rng(2024)
    outcomes = {"ran": 0, "refused": 0}
    kinds_refused = set()
    for i, (kind, blob) in enumerate(mutations(data, rng, 280)):
        path = tmp_path / f"m{i}.gguf"
        path.write_bytes(blob)
        t = time.perf_counter()
        try:
            m = sparserun.load(path, n_ctx=16, threads=1)
            out = m.logits([1, 15, 30, 2])
            assert out.shape == (4, m.n_vocab)
            outcomes["ran"] += 1
        except SparserunError as e:
            msg = str(e)
            assert "\n" not in msg and str(path) in msg, (kind, msg)
            outcomes["refused"] += 1
            kinds_refused.add(kind)
        assert time.perf_counter() - t < 30, f"mutation {i} (kind {kind}) took too long"
        path.unlink()
    assert outcomes["refused"] > 50 and outcomes["ran"] > 10, outcomes
    assert kinds_refused >= {0, 2, 3, 4, 5}, kinds_refused


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weights_are_named(stories, tmp_path, value):
    """A NaN or Inf in a layer's weights: the forward pass stops with the layer named; --check-tensors refuses the
    file at load naming the tensor; the CLI says either in one line with exit code 2."""
    import subprocess
    import sys

    m = sparserun.load(stories)
    t = m.gguf.tensor("blk.2.ffn_up.weight")
    at = t.raw.ctypes.data - m.gguf._data.ctypes.data + 4 * 100  # row 0, value 100 (F32)
    blob = bytearray(stories.read_bytes())
    blob[at:at + 4] = np.float32(value).tobytes()
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(blob))
    with pytest.raises(SparserunError, match="non-finite .* in layer 2"):
        sparserun.load(path).logits([1, 15, 30])
    with pytest.raises(SparserunError, match="tensor 'blk.2.ffn_up.weight' holds a non-finite value"):
        sparserun.load(path, check_tensors=True)
    for extra in ([], ["--check-tensors"]):
        r = subprocess.run([sys.executable, "-m", "sparserun.cli", "generate", str(path), "-p", "Once", "-n", "4",
                            *extra], capture_output=True, text=True, timeout=300)
        lines = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith("sparserun: compiling")]
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("head", ["dense", "hot:128"])
def test_non_finite_output_head_is_named(stories, tmp_path, head):
    """A NaN in a row of the output head: the dense head's logits and the hot head's estimate (whose fit reads every
    cold row) each stop with one line naming the file, exit code 2; --check-tensors names the tensor at load."""
    import os
    import subprocess
    import sys

    m = sparserun.load(stories)
    t = m.gguf.tensor(m.output.name)
    at = t.raw.ctypes.data - m.gguf._data.ctypes.data + 4 * (m.args.dim * 300 + 5)  # row 300 (cold at hot:128)
    blob = bytearray(stories.read_bytes())
    blob[at:at + 4] = np.float32(np.nan).tobytes()
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(blob))
    env = {**os.environ, "SPARSERUN_CACHE": str(tmp_path / "cache")}
    for extra in ([], ["--check-tensors"]):
        r = subprocess.run([sys.executable, "-m", "sparserun.cli", "generate", str(path), "-p", "Once", "-n", "4",
                            "--head", head, *extra], capture_output=True, text=True, timeout=300, env=env)
        lines = [x for x in r.stderr.splitlines() if x.strip() and not x.startswith("sparserun: compiling")
                 and not x.startswith("hot head: no profile")]
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert str(path) in lines[0] and ("non-finite" in lines[0]), lines[0]
    if head != "dense":  # with a profile the fit comes first, and its check names the tensor
        from sparserun.head import HotHead

        with pytest.raises(SparserunError, match=f"{path}: tensor 'output.weight' holds a non-finite value"):
            HotHead(sparserun.load(path), 128, cov=np.eye(m.args.dim))


@pytest.mark.filterwarnings("error")  # a warning would be a second line on the CLI's stderr
def test_mutated_side_files_are_refused_in_one_line(stories, tmp_path):
    """Profile, placement and predictor files, each mutated 40 ways (metadata and data bytes, truncation): each
    loads, or is refused with one line naming the file; never another exception."""
    from predictors.format import load_predictors
    from predictors.train import train_predictors
    from sparserun.placement import device_bytes, load_placement, plan, save_placement
    from sparserun.profile import load_profile, profile_model, save_profile

    m = sparserun.load(stories)
    ids = m.tokenize("Once upon a time, there was a little girl named Lily. She loved to play outside in the park "
                     "with her friends. One day, she saw a big red ball near the tree and ran to get it.")
    prof = profile_model(m, ids)
    save_profile(prof, tmp_path / "profile.gguf")
    save_placement(plan(m, device_bytes(m) // 3, prof.frequency), tmp_path / "placement.gguf")
    pset, _ = train_predictors(m, ids, ranks=(8,), epochs=0)
    pset.save(tmp_path / "predictors.gguf")
    loaders = {"profile.gguf": lambda p: load_profile(p, m), "placement.gguf": lambda p: load_placement(p, m),
               "predictors.gguf": lambda p: load_predictors(p, m)}
    rng = np.random.default_rng(7)
    refused = 0
    for name, load in loaders.items():
        data = (tmp_path / name).read_bytes()
        load(tmp_path / name)  # the unmutated file loads
        for i in range(40):
            d = bytearray(data)
            if i % 3 == 0:
                d = d[:int(rng.integers(0, len(d)))]
            else:
                lo, hi = (8, min(len(d), 4096)) if i % 3 == 1 else (0, len(d))
                for at in rng.integers(lo, hi, 6):
                    d[at] = rng.integers(0, 256)
            path = tmp_path / f"m{i}-{name}"
            path.write_bytes(bytes(d))
            try:
                load(path)
            except SparserunError as e:
                assert "\n" not in str(e) and str(path) in str(e), str(e)
                refused += 1
    assert refused > 40
