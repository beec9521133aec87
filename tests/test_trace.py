"""`--trace`: which parts of the model ran for which token, as JSON lines (trace.py)."""
import json
import os
import subprocess
import sys

import numpy as np

import sparserun
from sparserun.trace import read_trace


def lines(path):
    return [json.loads(x) for x in open(path)]


def test_dense_trace_has_every_token_and_layer_whole(stories, tmp_path):
    """A dense model's trace: a header bound to the model, then one line per computed token (prompt and output, in
    position order), every layer's FFN and every matrix read whole; the head computed for the tokens whose logits
    were asked for."""
    m = sparserun.load(stories)
    path = tmp_path / "t.jsonl"
    m.start_trace(path)
    out = "".join(m.generate("Once upon a time", max_tokens=6, temperature=0))
    m.stop_trace()
    head, *toks = lines(path)
    assert head["trace"] == 1 and head["fingerprint"] == m.gguf.fingerprint() and head["sparsity"] == "dense"
    prompt = m.tokenize("Once upon a time")
    assert [t["pos"] for t in toks] == list(range(len(toks))) and len(toks) >= len(prompt) + 5
    assert [t["token"] for t in toks[:len(prompt)]] == prompt
    assert "".join(t["piece"] for t in toks[len(prompt):])[:len(out) - 2] == out[:len(out) - 2]
    for t in toks:
        assert len(t["layers"]) == m.args.n_layer
        assert all(e["kept"] == 1.0 and set(e["read"].values()) == {1.0} for e in t["layers"])
    assert toks[len(prompt) - 1]["head"] == 1.0 and toks[0]["head"] == 0.0  # the prompt's last token's logits only


def test_sparse_trace_reports_the_kept_neurons_and_changes_nothing(make_model, tmp_path):
    """threshold:0 on a planted ReLU model: a decode token's line gives each layer's kept share, the up rows and
    down columns read at that share and the gate read whole (the dense selection); with ids, exactly the neurons
    whose gate activation is positive (the fused kernel makes way for the unfused path, which keeps the same ones,
    summed in another order). Logits with a trace of shares are those without, bit for bit."""
    path = make_model("F32", shape="tiny", planted=0.8)
    m = sparserun.load(path, sparsity="threshold:0")
    ids = m.tokenize("The quick brown fox jumps over the lazy dog")
    m.eval(ids[:-1])
    want = m.eval(ids)
    for with_ids in (False, True):
        m.reset()
        m.eval(ids[:-1])
        gates = {}
        m.start_trace(tmp_path / "t.jsonl", ids=with_ids)
        orig = m.ffn
        m.ffn = lambda li, acts: gates.setdefault(li, acts.x.copy()) is not None and orig(li, acts)
        got = m.eval(ids)
        m.stop_trace()
        del m.ffn
        if with_ids:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        else:
            np.testing.assert_array_equal(got, want)
            shares = [e["kept"] for e in read_trace(tmp_path / "t.jsonl")[1][0]["layers"]]
    head, tokens = read_trace(tmp_path / "t.jsonl", m.gguf.fingerprint())
    assert [e["kept"] for e in tokens[0]["layers"]] == shares
    assert len(tokens) == 1 and tokens[0]["pos"] == len(ids) - 1
    for li, e in enumerate(tokens[0]["layers"]):
        L = m.layers[li]
        active = np.flatnonzero(L.w_gate.matmul(sparserun.weights.Acts(gates[li]))[0] > 0)
        assert e["ids"] == active.tolist()
        assert abs(e["kept"] - len(active) / m.args.n_ff) < 1e-6 and 0 < e["kept"] < 0.5
        assert e["read"]["ffn_gate"] == 1.0 and e["read"]["ffn_up"] == e["read"]["ffn_down"] == e["kept"]


def test_trace_on_the_command_line_and_its_heat_map(stories, tmp_path):
    """generate --trace writes the file, bench --trace its first sparse mode's fidelity pass; profile --trace --plot
    draws its layer x token heat map; a trace of another
    model, or a file that is not a trace, is refused in one line (exit 2)."""
    env = dict(os.environ)
    run = lambda *a: subprocess.run([sys.executable, "-m", "sparserun.cli", *map(str, a)], capture_output=True,  # noqa: E731
                                    text=True, timeout=600, env=env)
    t = tmp_path / "t.jsonl"
    r = run("generate", stories, "-p", "Once upon a time", "-n", "5", "--temp", "0", "--trace", t)
    assert r.returncode == 0, r.stderr
    assert len(lines(t)) >= 1 + 5
    b = tmp_path / "b.jsonl"  # bench: the sparse mode's fidelity pass, one token a line
    r = run("bench", stories, "-p", "8", "-n", "4", "-r", "1", "--modes", "dense,sparse", "--sparsity", "topk:0.1",
            "--fidelity-tokens", "12", "--trace", b)
    assert r.returncode == 0, r.stderr
    head, *toks = lines(b)
    assert head["sparsity"] == "topk:0.1" and [t["pos"] for t in toks] == list(range(12))
    assert all(e["kept"] < 0.2 for t in toks for e in t["layers"])
    png = tmp_path / "heat.png"
    r = run("profile", stories, "--trace", t, "--plot", png)
    assert r.returncode == 0, r.stderr
    assert png.read_bytes()[:4] == b"\x89PNG" and "5 layers x" in r.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    r = run("profile", stories, "--trace", bad, "--plot", png)
    assert r.returncode == 2 and "not a trace" in r.stderr and "Traceback" not in r.stderr
    other = tmp_path / "other.jsonl"
    first, *rest = lines(t)
    other.write_text("\n".join(json.dumps(x) for x in [dict(first, fingerprint="0" * 32)] + rest) + "\n")
    r = run("profile", stories, "--trace", other, "--plot", png)
    assert r.returncode == 2 and "another model" in r.stderr
