"""Recipe: train the project's demo model, models/storyteller.gguf, from nothing on 2 CPU cores.

    pip install -e ".[train]"           # torch and sentencepiece: the recipe's only extra dependencies
    python -m models.train_storyteller --minutes 45 -o models/storyteller.gguf

1. Text: models/storyworld.py generates simple stories and story-request chats (train: seed 0, held-out: seed 1).
2. Tokenizer: a SentencePiece BPE vocabulary (1024 pieces, byte fallback) trained on the text and embedded in
   the GGUF as a llama SPM vocabulary; the training ids are then made by llama.cpp's own tokenizer from that
   GGUF, so training and runtime tokenize identically.
3. Model: a 6-layer llama with a gated ReLU FFN (models/storyteller_torch.py), AdamW, bf16 autocast, for a
   fixed wall-clock budget with a time-based cosine schedule; held-out loss logged as it goes.
4. Export: F32 GGUF (llama architecture, llama.ffn_activation = relu), then a check that sparserun's forward
   pass on the exported file matches PyTorch's, and the figures in <out>.train.json.
"""
import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from models.make_test_model import add_llama_hparams
from models.storyworld import documents

REPO = Path(__file__).resolve().parent.parent


def train_tokenizer(docs, vocab_size, workdir):
    """SentencePiece BPE with byte fallback; returns the SentencePieceProcessor."""
    import sentencepiece as spm

    text = Path(workdir) / "spm.txt"
    text.write_text("\n".join(line for d in docs for line in d.split("\n")))
    prefix = str(Path(workdir) / "spm")
    spm.SentencePieceTrainer.train(
        input=str(text), model_prefix=prefix, model_type="bpe", vocab_size=vocab_size, byte_fallback=True,
        character_coverage=1.0, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        input_sentence_size=200000, shuffle_input_sentence=True, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=prefix + ".model")


def vocab_fields(sp):
    """tokens, scores and llama token types (1 normal, 2 unknown, 3 control, 6 byte) of a SentencePiece model."""
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else
                     5 if sp.is_unused(i) else 1)
    return tokens, scores, types


def export_gguf(path, cfg, weights, sp, extra=None):
    """weights: GGUF tensor name -> float32 array. Writes a llama GGUF with the SPM vocabulary embedded."""
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_name("sparserun-storyteller")
    w.add_description("A small gated-ReLU llama trained by sparserun's models/train_storyteller.py on "
                      "generated children's stories (models/storyworld.py).")
    w.add_license("MIT")
    add_llama_hparams(w, cfg.ctx, cfg.dim, cfg.layers, cfg.ff, cfg.heads, cfg.heads, cfg.rope_base, cfg.eps)
    w.add_file_type(0)
    w.add_string("llama.ffn_activation", "relu")
    tokens, scores, types = vocab_fields(sp)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    for k, v in (extra or {}).items():
        w.add_string(k, v)
    for name, arr in weights.items():
        w.add_tensor(name, np.ascontiguousarray(arr, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_weights(model):
    """The torch model's parameters under GGUF llama tensor names (torch Linear is (out, in): GGUF's row order)."""
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["embed.weight"], "output_norm.weight": sd["norm.weight"]}
    names = {"attn_norm.weight": "attn_norm.weight", "attn_q.weight": "q.weight", "attn_k.weight": "k.weight",
             "attn_v.weight": "v.weight", "attn_output.weight": "o.weight", "ffn_norm.weight": "ffn_norm.weight",
             "ffn_gate.weight": "gate.weight", "ffn_up.weight": "up.weight", "ffn_down.weight": "down.weight"}
    for i in range(model.cfg.layers):
        for g, t in names.items():
            out[f"blk.{i}.{g}"] = sd[f"blocks.{i}.{t}"]
    return out


def token_stream(tok, docs):
    """[BOS] doc [EOS] for every document, concatenated: int32 array."""
    ids = []
    for d in docs:
        ids.append(tok.bos_id)
        ids.extend(tok.encode(d, add_bos=False, special=False))
        ids.append(tok.eos_id)
    return np.asarray(ids, dtype=np.int32)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", default=str(REPO / "models" / "storyteller.gguf"))
    ap.add_argument("--minutes", type=float, default=45.0, help="wall-clock training budget")
    ap.add_argument("--docs", type=int, default=80000, help="training documents")
    ap.add_argument("--heldout-docs", type=int, default=1000)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--ff", type=int, default=1024)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from models.storyteller_torch import Config, Storyteller
    from sparserun.tokenizer import Tokenizer

    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    t0 = time.time()
    train_docs = documents(a.docs, seed=a.seed)
    held_docs = documents(a.heldout_docs, seed=a.seed + 1)
    cfg = Config(vocab=a.vocab, dim=a.dim, layers=a.layers, heads=a.heads, ff=a.ff, ctx=a.ctx)
    model = Storyteller(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        sp = train_tokenizer(train_docs[:20000], a.vocab, tmp)
        probe = Path(tmp) / "probe.gguf"  # the untrained model: only its vocabulary is used, by llama.cpp
        export_gguf(probe, cfg, gguf_weights(model), sp)
        tok = Tokenizer(probe)
        mismatch = sum(tok.encode(d, add_bos=False, special=False) != sp.encode(d) for d in held_docs[:200])
        train_ids, held_ids = token_stream(tok, train_docs), token_stream(tok, held_docs)
    print(f"text and tokenizer: {time.time() - t0:.0f} s; {len(train_ids) / 1e6:.2f}M train tokens, "
          f"{len(held_ids) / 1e3:.0f}k held-out; {train_ids.size / sum(map(len, train_docs)) ** 1:.3f} tokens/char; "
          f"llama.cpp vs SentencePiece ids differ on {mismatch}/200 held-out docs", flush=True)
    print(f"model: {model.n_params() / 1e6:.2f}M parameters ({cfg})", flush=True)

    rng = np.random.default_rng(a.seed)
    n_eval = min(64, (len(held_ids) - 1) // (cfg.ctx + 1))
    eval_batch = torch.from_numpy(held_ids[: n_eval * (cfg.ctx + 1)].reshape(n_eval, cfg.ctx + 1).astype(np.int64))

    def heldout_loss():
        model.eval()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            tot = 0.0
            for i in range(0, n_eval, 16):
                b = eval_batch[i:i + 16]
                logits = model(b[:, :-1]).float()
                tot += F.cross_entropy(logits.reshape(-1, cfg.vocab), b[:, 1:].reshape(-1), reduction="sum").item()
        model.train()
        return tot / (n_eval * cfg.ctx)

    decay = [p for n, p in model.named_parameters() if p.dim() == 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95))
    budget = a.minutes * 60.0
    log, step, seen, warmup = [], 0, 0, 100
    t_start = time.time()
    next_eval = 0.0
    while True:
        elapsed = time.time() - t_start
        frac = min(1.0, elapsed / budget)
        lr = a.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        if elapsed >= next_eval or frac >= 1.0:
            hl = heldout_loss()
            log.append({"step": step, "tokens": seen, "minutes": round(elapsed / 60, 2), "heldout_loss": round(hl, 4),
                        "heldout_ppl": round(math.exp(hl), 3), "lr": lr})
            print(f"step {step:5d}  {seen / 1e6:6.2f}M tok  {elapsed / 60:5.1f} min  held-out loss {hl:.3f} "
                  f"(ppl {math.exp(hl):.2f})  lr {lr:.2e}", flush=True)
            next_eval += budget / 15
            if frac >= 1.0:
                break
        starts = rng.integers(0, len(train_ids) - cfg.ctx - 1, a.batch)
        b = torch.from_numpy(np.stack([train_ids[s:s + cfg.ctx + 1] for s in starts]).astype(np.int64))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(b[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab), b[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            log[-1].setdefault("train_loss", []).append(round(loss.item(), 4))
        step += 1
        seen += b[:, 1:].numel()

    model.eval()
    export_gguf(out, cfg, gguf_weights(model), sp)
    # the exported file, run by sparserun, must compute what PyTorch computes (F32, no autocast)
    from sparserun.model import load

    m = load(out, threads=a.threads, n_ctx=256)
    ids = [int(t) for t in held_ids[:200]]
    ours = m.logits(ids)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).float().numpy()[0]
    diff = float(np.abs(ours - ref).max())
    report = {"parameters": model.n_params(), "config": cfg.__dict__, "train_tokens_seen": seen, "steps": step,
              "train_minutes": round((time.time() - t_start) / 60, 1), "threads": a.threads,
              "train_docs": a.docs, "train_token_count": int(train_ids.size), "heldout_tokens": int(n_eval * cfg.ctx),
              "final_heldout_loss": log[-1]["heldout_loss"], "final_heldout_ppl": log[-1]["heldout_ppl"],
              "export_max_abs_logit_diff_vs_torch": diff, "file_mb": round(out.stat().st_size / 1e6, 2), "log": log}
    Path(str(out) + ".train.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out} ({report['file_mb']} MB); held-out ppl {report['final_heldout_ppl']}; "
          f"sparserun vs torch max |d logit| {diff:.2e}")


if __name__ == "__main__":
    sys.exit(main())
