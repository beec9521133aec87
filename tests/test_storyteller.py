"""The project's own demo model, models/storyteller.gguf (recipe: models/train_storyteller.py): its tokenizer,
its text, its real ReLU sparsity, and the profiling / predictor tools run on it."""
import re
from pathlib import Path

import numpy as np
import pytest

import sparserun
from models.storyworld import documents
STORYTELLER = Path(__file__).resolve().parent.parent / "models" / "storyteller.gguf"


@pytest.fixture(scope="module")
def st():
    if not STORYTELLER.exists():
        pytest.fail(f"{STORYTELLER} is missing: it is committed with the repository (rebuild: models/train_storyteller.py)")
    return sparserun.load(STORYTELLER, n_ctx=512)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSERUN_CACHE", str(tmp_path / "cache"))


def corpus_words(n=3000):
    return {w for d in documents(n, seed=7) for w in re.findall(r"[A-Za-z']+", d)}


def heldout_text(n=6, seed=12345):
    """Documents the model never saw (training used seed 0, its held-out set seed 1)."""
    return documents(n, seed=seed)


def test_metadata_and_tokenizer(st):
    assert st.args.activation == "relu" and st.args.n_vocab == 1024
    assert STORYTELLER.stat().st_size < 30e6
    tok = st.tokenizer
    for d in heldout_text(20):
        ids = tok.encode(d, add_bos=False)
        assert tok.decode(ids) in (d, " " + d)  # llama.cpp round-trips it (SentencePiece's leading space aside)
        assert len(d) / len(ids) > 3.0  # a real trained BPE vocabulary, not bytes


def test_heldout_perplexity(st):
    """Next-token perplexity on unseen generated documents, computed by this engine from the GGUF."""
    nll, n = 0.0, 0
    for d in heldout_text(4):
        ids = [st.tokenizer.bos_id] + st.tokenize(d, add_bos=False) + [st.tokenizer.eos_id]
        logits = st.logits(ids)[:-1].astype(np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll -= logp[np.arange(len(ids) - 1), ids[1:]].sum()
        n += len(ids) - 1
    ppl = float(np.exp(nll / n))
    assert ppl < 2.5, ppl  # a uniform guess over the 1024 tokens would be 1024


def test_greedy_story_is_of_its_corpus(st):
    text = "".join(st.generate("Once upon a time", max_tokens=120, temperature=0.0))
    words = re.findall(r"[A-Za-z']+", text)
    known = corpus_words()
    assert len(words) > 40
    assert np.mean([w in known for w in words]) > 0.97, text
    assert text.count(".") >= 4, text  # sentences, not a loop of one phrase


def test_chat_answers_a_story_request(st):
    """A request in the chat format gets a story that features what was asked for."""
    prompt = "User: Tell me a story about a red kite.\nAssistant:"
    text = "".join(st.generate(prompt, max_tokens=160, temperature=0.0)).split("\nUser:")[0]
    assert "kite" in text and len(text.split()) > 30, text


def test_relu_zeros_skipped_exactly(st):
    ids = st.tokenize(heldout_text(1)[0])[:48]
    dense = st.logits(ids)
    sparse = sparserun.load(STORYTELLER, n_ctx=64, sparsity="threshold:0")
    dec = np.concatenate([sparse.eval(ids[:i + 1]) for i in range(len(ids))])
    assert np.abs(dec - dense).max() < 1e-3 * dense.std()


def test_profile_measures_real_sparsity(st):
    from sparserun.profile import profile_model

    ids = st.tokenize(" ".join(heldout_text(6)))[:600]
    p = profile_model(st, ids)
    rows = p.summary()
    assert len(rows) == st.args.n_layer
    for r in rows:  # trained ReLU: most gate activations are exactly zero; hotness is uneven (0.8 if uniform)
        assert r["sparsity"] > 0.55 and r["neurons_for_80pct"] < 0.78, r


def test_predictors_learn_the_real_activations(st):
    from predictors.train import train_predictors

    ids = st.tokenize(" ".join(heldout_text(10, seed=99)))[:900]
    pset, report = train_predictors(st, ids, target_recall=0.9, ranks=(32, 64), epochs=15)
    for r in report:  # held-out split of the collected tokens
        assert r["recall"] > 0.8 and r["predicted_density"] < 0.9, r


def test_cli_defaults_to_the_storyteller(monkeypatch):
    from typer.testing import CliRunner

    from sparserun.cli import app

    monkeypatch.delenv("SPARSERUN_MODEL", raising=False)
    r = CliRunner().invoke(app, ["generate", "-p", "Once upon a time", "-n", "20", "--temp", "0"])
    assert r.exit_code == 0 and r.output.startswith("Once upon a time") and len(r.output.split()) > 10, r.output
    r = CliRunner().invoke(app, ["chat", "--temp", "0", "-n", "80"], input="Tell me a story about a dog.\n")
    assert r.exit_code == 0 and len(r.output.split()) > 15, r.output
