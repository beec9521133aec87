"""Bad input is one line on stderr and exit code 2: never a traceback, never a crash in a kernel."""
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

import sparserun
from sparserun.errors import ModelFileError


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "sparserun.cli", *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=300)


def assert_one_line_error(r, *words):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def write_gguf(path, arch="llama", embd_type=GGMLQuantizationType.F32):
    w = GGUFWriter(str(path), arch)
    w.add_embedding_length(32)
    w.add_block_count(0)
    w.add_feed_forward_length(64)
    w.add_head_count(2)
    w.add_context_length(64)
    emb = np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32)
    if embd_type == GGMLQuantizationType.F32:
        w.add_tensor("token_embd.weight", emb)
    else:  # random blocks of a type the engine does not read (16 rows of one block each)
        block, block_bytes = GGML_QUANT_SIZES[embd_type]
        raw = np.random.default_rng(0).integers(0, 256, (16, block_bytes), dtype=np.uint8)
        w.add_tensor("token_embd.weight", raw, raw_dtype=embd_type)
    w.add_tensor("output_norm.weight", np.ones(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def bad_files(tmp_path, stories):
    data = stories.read_bytes()
    files = {
        "missing": (tmp_path / "nope.gguf", "no such file"),
        "not gguf": (tmp_path / "text.gguf", "not a GGUF file"),
        "truncated": (tmp_path / "trunc.gguf", "truncated"),
        "corrupted header": (tmp_path / "hdr.gguf", "corrupted"),
        "unsupported type": (write_gguf(tmp_path / "iq2.gguf", embd_type=GGMLQuantizationType.IQ2_XXS),
                             "token_embd.weight' has unsupported type IQ2_XXS"),
        "unsupported arch": (write_gguf(tmp_path / "gpt2.gguf", arch="gpt2"), "unsupported architecture 'gpt2'"),
    }
    (tmp_path / "text.gguf").write_text("hello, not a model\n")
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) // 2])
    bad = bytearray(data[:4096])
    bad[8:16] = (2**40).to_bytes(8, "little")  # absurd tensor count
    (tmp_path / "hdr.gguf").write_bytes(bytes(bad))
    return files


@pytest.mark.parametrize("case", ["missing", "not gguf", "truncated", "corrupted header", "unsupported type", "unsupported arch"])
def test_bad_model_file_api_error(bad_files, case):
    path, words = bad_files[case]
    with pytest.raises(ModelFileError) as e:
        sparserun.load(path)
    assert str(path) in str(e.value) and words in str(e.value)


@pytest.mark.parametrize("case", ["missing", "not gguf", "truncated", "unsupported type"])
@pytest.mark.parametrize("command", ["info", "generate"])
def test_bad_model_file_cli(bad_files, case, command):
    path, words = bad_files[case]
    assert_one_line_error(run_cli(command, path), str(path), words)


def test_bad_flag_values(stories):
    assert_one_line_error(run_cli("generate", stories, "--top-p", "1.5"), "top_p")
    assert_one_line_error(run_cli("generate", stories, "--threads", "100000"), "threads")
    assert_one_line_error(run_cli("bench", stories, "--modes", "turbo"), "turbo")
    assert_one_line_error(run_cli("generate", stories, "--sparsity", "topk:2.5"), "k must be")
    assert_one_line_error(run_cli("bench", stories, "--sparsity", "fast"), "unknown policy")
    assert_one_line_error(run_cli("chat", stories, "--sparsity", "threshold:missing.json"), "no such thresholds file")
    assert_one_line_error(run_cli("generate", stories, "--kv-type", "q8"), "KV cache type")
    assert_one_line_error(run_cli("bench", stories, "-d", "-5"), "depth")
    r = run_cli("generate", stories, "--temp", "hot")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_token_ids_out_of_range(stories):
    m = sparserun.load(stories)
    with pytest.raises(sparserun.SparserunError, match="out of range"):
        m.logits([1, 99999])
