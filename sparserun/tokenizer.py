"""Exact llama.cpp tokenization through llama-cpp-python, loaded with vocab_only (no weights read)."""
import contextlib
import os

from .errors import ModelFileError


@contextlib.contextmanager
def quiet_stderr():
    """Silence llama.cpp's logging: C-level writes to fd 2 (even with verbose=False), and the lines
    llama-cpp-python's log callback writes to sys.stderr (which may not be fd 2, e.g. under a test runner)."""
    import sys

    fd = os.dup(2)
    saved = sys.stderr
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            sys.stderr = null
            yield
    finally:
        sys.stderr = saved
        os.dup2(fd, 2)
        os.close(fd)


class Tokenizer:
    def __init__(self, path):
        import llama_cpp

        from .powerinfer import vocab_path

        try:
            with quiet_stderr():
                self._llama = llama_cpp.Llama(model_path=str(vocab_path(path)), vocab_only=True, verbose=False, n_ctx=8)
        except Exception as e:
            raise ModelFileError(path, f"llama.cpp could not load its vocabulary ({str(e)[:120]})") from None
        self.n_vocab = self._llama.n_vocab()
        self.bos_id = self._llama.token_bos()
        self.eos_id = self._llama.token_eos()
        self.metadata = self._llama.metadata
        import llama_cpp as lc

        vocab = lc.llama_model_get_vocab(self._llama.model)
        self._is_eog = lambda t: bool(lc.llama_vocab_is_eog(vocab, t))

    def encode(self, text, add_bos=True, special=True):
        """Token ids of text; `special` parses control tokens written in the text (e.g. <|im_start|>)."""
        return self._llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def decode_bytes(self, ids, prev=None):
        """UTF-8 bytes of ids. With `prev` (the tokens just before them) the result is what ids add to
        the decoded text in that context: SentencePiece drops a leading space only at the start of text."""
        if not prev:
            return self._llama.detokenize(list(ids))
        prev = list(prev)
        head = self._llama.detokenize(prev)
        full = self._llama.detokenize(prev + list(ids))
        return full[len(head):] if full.startswith(head) else self._llama.detokenize(list(ids))

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def is_end(self, token):
        """True for end-of-generation tokens (EOS, EOT, <|im_end|>, ...)."""
        return token == self.eos_id or self._is_eog(token)
