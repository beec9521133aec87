"""Token generation: prompt -> stream of text pieces, with the KV cache reused across calls."""
import codecs
import time

import numpy as np

from .sampling import SamplingParams, sample


class GenerationStats:
    def __init__(self):
        self.prompt_tokens = self.gen_tokens = 0
        self.prompt_seconds = self.gen_seconds = 0.0
        self.stop_reason = None

    def line(self):
        pp = self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0
        tg = self.gen_tokens / self.gen_seconds if self.gen_seconds else 0.0
        return (f"prompt: {self.prompt_tokens} tokens, {pp:.1f} tok/s | generation: {self.gen_tokens} tokens, "
                f"{tg:.1f} tok/s")


def generate(model, prompt, max_tokens=128, stats=None, add_bos=True, stop_at_end=True, context_shift=False,
             **sampling):
    """Yield text pieces continuing `prompt` (text, or a list of token ids). Sampling keywords are
    SamplingParams fields. The prompt reuses whatever prefix of it is already in the KV cache, and with
    context_shift the cache is shifted where the prompt is the cached context with a span cut out (Model.eval).
    Stops at an end-of-generation token, after max_tokens, or when the context is full
    (stats.stop_reason says which)."""
    params = SamplingParams(**sampling).validate()
    stats = stats if stats is not None else GenerationStats()
    tok = model.tokenizer
    ids = list(prompt) if not isinstance(prompt, str) else tok.encode(prompt, add_bos=add_bos)
    rng = np.random.default_rng(params.seed)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    t0 = time.perf_counter()
    logits = model.eval(ids, shift=context_shift)[-1]
    stats.prompt_tokens, stats.prompt_seconds = model.last_processed, time.perf_counter() - t0
    t0 = time.perf_counter()
    context = list(ids)
    try:
        for _ in range(max_tokens):
            t = sample(logits, params, rng, context)
            if stop_at_end and tok.is_end(t):
                stats.stop_reason = "end"
                break
            piece = decoder.decode(tok.decode_bytes([t], prev=context[-8:]))
            context.append(t)
            stats.gen_tokens += 1
            if piece:
                yield piece
            if len(context) >= model.n_ctx:
                stats.stop_reason = "context"
                break
            logits = model.eval(context)[-1]
        else:
            stats.stop_reason = "length"
    finally:
        stats.gen_seconds = time.perf_counter() - t0
        stats.tokens = context

