"""`sparserun perplexity`: perplexity over a text, computed as llama.cpp's llama-perplexity computes it.

The text is tokenized once (with BOS) and cut into chunks of n_ctx tokens; each chunk runs in a fresh context with
its first token set to BOS, and only its second half is scored (each scored token has at least n_ctx / 2 tokens of
context): for j in [n_ctx / 2, n_ctx - 1), -log p(token j+1 | tokens 0..j). The running estimate is printed after
each chunk, and the final one with its standard error (the delta method on the mean negative log-likelihood), as
llama-perplexity prints them. The model runs with whatever sparsity policy and output head it was loaded with, so the
same command measures what a policy or the hot head costs; `--llama-cpp` scores the same chunks with llama.cpp
(llama-cpp-python) for the dense reference.
"""
import math

import numpy as np

from .errors import SparserunError


def chunk_tokens(ids, n_ctx, n_chunks=None, bos=None):
    """The chunks as lists of n_ctx token ids (first one replaced by bos when the model has one)."""
    if n_ctx < 16:
        raise SparserunError(f"perplexity needs a context of at least 16 tokens, got {n_ctx}")
    total = len(ids) // n_ctx
    if total < 1:
        raise SparserunError(f"the text has {len(ids)} tokens: fewer than one chunk of {n_ctx} (give more text or a "
                             "smaller --ctx)")
    n = total if n_chunks is None else min(total, n_chunks)
    out = []
    for c in range(n):
        toks = [int(t) for t in ids[c * n_ctx:(c + 1) * n_ctx]]
        if bos is not None and bos >= 0:
            toks[0] = int(bos)
        out.append(toks)
    return out


def chunk_nll(logits, toks):
    """Negative log-likelihoods of the chunk's scored tokens from its logits (n_ctx, V), float64, row by row (a
    262k vocabulary's rows in float64 are 2 MB each)."""
    first = len(toks) // 2
    out = np.empty(len(toks) - 1 - first)
    for i, j in enumerate(range(first, len(toks) - 1)):
        row = logits[j].astype(np.float64)
        m = row.max()
        out[i] = m + math.log(np.exp(row - m).sum()) - row[toks[j + 1]]
    return out


def summary(nll):
    """(perplexity, its standard error) of a sample of negative log-likelihoods, as llama-perplexity reports them."""
    nll = np.asarray(nll, np.float64)
    mean = nll.mean()
    sem = nll.std(ddof=1) / math.sqrt(len(nll)) if len(nll) > 1 else float("nan")
    ppl = math.exp(mean)
    return ppl, ppl * sem


def model_perplexity(model, chunks, on_chunk=None):
    """Score chunks with this engine; on_chunk(i, running ppl) after each. Returns all scored tokens' nll."""
    nll = []
    for i, toks in enumerate(chunks):
        model.reset()
        nll.extend(chunk_nll(model.eval(toks, all_logits=True), toks))
        if on_chunk:
            on_chunk(i, summary(nll)[0])
    return np.array(nll)


def llama_cpp_perplexity(path, chunks, threads, on_chunk=None):
    """The same chunks scored by llama.cpp (logits of every position)."""
    import llama_cpp

    from .tokenizer import quiet_stderr

    n_ctx = len(chunks[0])
    with quiet_stderr():
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), n_threads=threads,
                              n_threads_batch=threads, logits_all=True, verbose=False)
    nll = []
    for i, toks in enumerate(chunks):
        llm.reset()
        llm.eval(toks)
        nll.extend(chunk_nll(np.asarray(llm.scores[:n_ctx], np.float32), toks))
        if on_chunk:
            on_chunk(i, summary(nll)[0])
    return np.array(nll)
