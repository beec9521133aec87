"""Tokenization is llama.cpp's own: check it on llama.cpp's test vectors and round trips."""
import pytest

from conftest import VOCAB
from sparserun.tokenizer import Tokenizer

VOCABS = ["llama-spm", "phi-3", "gpt-2", "falcon", "deepseek-llm", "bert-bge"]


def vectors(name):
    base = VOCAB / f"ggml-vocab-{name}.gguf"
    texts = base.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outs = base.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")
    return base, [(t, [int(x) for x in o.split()]) for t, o in zip(texts, outs)]


@pytest.mark.parametrize("name", VOCABS)
def test_llama_cpp_vectors(name):
    path, cases = vectors(name)
    tok = Tokenizer(path)
    assert len(cases) > 20
    for text, ids in cases:
        assert tok.encode(text, add_bos=False, special=False) == ids, text


@pytest.mark.parametrize("name", ["llama-spm", "phi-3", "gpt-2"])
def test_round_trip(name):
    path, cases = vectors(name)
    tok = Tokenizer(path)
    for text, _ in cases:
        # with BOS, as text is encoded for a model: SentencePiece's dummy-prefix space is then dropped on decode
        assert tok.decode(tok.encode(text, add_bos=True, special=False)) == text, repr(text)


def test_bos_and_special_tokens():
    tok = Tokenizer(VOCAB / "ggml-vocab-llama-spm.gguf")
    ids = tok.encode("Hello", add_bos=True)
    assert ids[0] == tok.bos_id == 1 and tok.eos_id == 2
    assert tok.encode("</s>", add_bos=False, special=True) == [2]  # control token parsed
    assert tok.encode("</s>", add_bos=False, special=False) != [2]  # or kept as text
    assert tok.is_end(tok.eos_id) and not tok.is_end(ids[-1])


def test_streaming_decode_keeps_spaces():
    tok = Tokenizer(VOCAB / "ggml-vocab-llama-spm.gguf")
    ids = tok.encode("Hello world, how are you?")
    pieces = b"".join(tok.decode_bytes([t], prev=ids[:i]) for i, t in enumerate(ids) if i > 0)
    assert pieces.decode() == "Hello world, how are you?"
