"""`sparserun chat`: an interactive REPL in the habits of Ollama and llama-cli.

Each turn renders the whole conversation with the model's chat template and hands it to
generate(), which reuses the KV cache for the prefix already processed, so a turn computes only its
new tokens. Commands: /help, /set, /show, /reset, /exit (or /bye, Ctrl-D); \"\"\" opens and closes a
multi-line message; Ctrl-C stops the answer being written, not the program.
"""
import sys

from .errors import SparserunError
from .generate import GenerationStats, generate
from .model import ContextFullError
from .sampling import SamplingParams

HELP = """commands:
  /set <param> <value>   sampling: temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed;
                         also: /set system <text>
  /show                  current settings
  /reset                 forget the conversation (keeps the system prompt)
  /exit, /bye, Ctrl-D    leave
  \"\"\"                    start / end a multi-line message
  Ctrl-C                 stop the current answer"""

FALLBACK_STOP = "\nUser:"


class PromptFormatter:
    """Conversation -> prompt text, from the GGUF's tokenizer.chat_template when it has one."""

    def __init__(self, model):
        self.tokenizer = tok = model.tokenizer
        template = tok.metadata.get("tokenizer.chat_template")
        self.stops = []
        if template:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            piece = lambda t: tok.decode_bytes([t]).decode("utf-8", "replace") if t >= 0 else ""
            self._jinja = Jinja2ChatFormatter(template, eos_token=piece(tok.eos_id), bos_token=piece(tok.bos_id))
            self._bos_text = piece(tok.bos_id)
        else:
            self._jinja = None
            self.stops = [FALLBACK_STOP]

    @property
    def name(self):
        return "GGUF chat template" if self._jinja else "plain (User:/Assistant:) fallback"

    def tokens(self, messages):
        """Prompt token ids and stop strings for a conversation; BOS is added unless the template wrote it."""
        text, stops = self.format(messages)
        add_bos = not (self._jinja and self._bos_text and text.startswith(self._bos_text))
        return self.tokenizer.encode(text, add_bos=add_bos, special=True), stops

    def format(self, messages):
        if self._jinja:
            r = self._jinja(messages=messages)
            return r.prompt, list(r.stop or []) if isinstance(r.stop, list) else ([r.stop] if r.stop else [])
        lines = []
        for m in messages:
            role = {"system": "System", "user": "User", "assistant": "Assistant"}[m["role"]]
            lines.append(f"{role}: {m['content']}")
        return "\n".join(lines) + "\nAssistant:", self.stops


class ChatSession:
    def __init__(self, model, system=None, params=None, out=sys.stdout, err=sys.stderr, max_tokens=1024):
        self.model, self.out, self.err = model, out, err
        self.params = params or SamplingParams()
        self.system, self.max_tokens = system, max_tokens
        self.reserve = min(max_tokens, model.n_ctx // 4) + 1  # room kept for an answer when the context is trimmed
        self.formatter = PromptFormatter(model)
        self.messages = []
        self.reset()

    def reset(self):
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _prompt_ids(self):
        return self.formatter.tokens(self.messages)

    def ask(self, user_text):
        """Answer one user message, streaming to self.out; returns the GenerationStats."""
        self.messages.append({"role": "user", "content": user_text})
        ids, stops = self._prompt_ids()
        # a full context drops the oldest half of the turns at once (the system prompt stays), as llama.cpp's
        # context shift discards half: the cache is then shifted, not recomputed (generate's context_shift), and the
        # next turns have room again
        while len(ids) + self.reserve > self.model.n_ctx:
            first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            turns = len(self.messages) - first - 1  # before the new user message
            if turns <= 0:
                self.messages.pop()
                raise ContextFullError(self.model.n_ctx, len(ids))
            drop = max(2, turns // 2 // 2 * 2)  # whole user/assistant pairs
            del self.messages[first:first + drop]
            self.err.write(f"[context full: dropped the oldest {drop // 2} turn{'s' if drop > 2 else ''}]\n")
            ids, stops = self._prompt_ids()
        stats = GenerationStats()
        answer = ""
        p = self.params
        gen = generate(self.model, ids, max_tokens=self.max_tokens, stats=stats, temperature=p.temperature,
                       top_k=p.top_k, top_p=p.top_p, min_p=p.min_p, repeat_penalty=p.repeat_penalty,
                       repeat_last_n=p.repeat_last_n, seed=p.seed, context_shift=True)
        shown = 0  # characters of `answer` already written (text that might begin a stop string is held back)
        try:
            for piece in gen:
                answer += piece
                cut = min((answer.find(s) for s in stops if s in answer), default=-1)
                if cut >= 0:
                    answer = answer[:cut]
                    stats.stop_reason = "stop"
                    break
                hold = max((len(s) - 1 for s in stops), default=0)
                safe = max(shown, len(answer) - hold)
                self.out.write(answer[shown:safe])
                self.out.flush()
                shown = safe
        except KeyboardInterrupt:
            stats.stop_reason = "interrupted"
        finally:
            gen.close()
        self.out.write(answer[shown:] + "\n")
        self.messages.append({"role": "assistant", "content": answer.strip()})
        if stats.stop_reason == "context":
            self.err.write("[context full: the answer was cut; older turns will be dropped next turn]\n")
        elif stats.stop_reason == "interrupted":
            self.err.write("[stopped]\n")
        return stats

    def command(self, line):
        """Handle a /command; returns False to leave the chat."""
        parts = line.split(maxsplit=2)
        cmd = parts[0].lower()
        if cmd in ("/exit", "/bye", "/quit"):
            return False
        if cmd == "/reset":
            self.reset()
            self.model.reset()
            self.err.write("[conversation reset]\n")
        elif cmd in ("/help", "/?"):
            self.err.write(HELP + "\n")
        elif cmd == "/show":
            self.err.write(f"model: {self.model.path}\ntemplate: {self.formatter.name}\nsystem: {self.system!r}\n"
                           f"{self.params}\ncontext: {len(self.model.cached)}/{self.model.n_ctx} tokens\n")
        elif cmd == "/set":
            self._set(parts[1:])
        else:
            self.err.write(f"unknown command {cmd}; /help lists them\n")
        return True

    def _set(self, args):
        if len(args) < 2:
            self.err.write("usage: /set <param> <value>  (/help lists the parameters)\n")
            return
        name, value = args[0].lower(), args[1]
        name = {"temp": "temperature", "topk": "top_k", "topp": "top_p", "minp": "min_p"}.get(name, name)
        if name == "system":
            self.system = value
            self.reset()
            self.err.write("[system prompt set; conversation reset]\n")
            return
        if name not in SamplingParams.names():
            self.err.write(f"unknown parameter {name!r}; one of: {', '.join(SamplingParams.names())}, system\n")
            return
        old = getattr(self.params, name)
        try:
            kind = int if name in ("top_k", "repeat_last_n", "seed") else float
            new = None if (name == "seed" and value.lower() == "none") else kind(value)
            setattr(self.params, name, new)
            self.params.validate()
        except (ValueError, SparserunError) as e:
            setattr(self.params, name, old)
            self.err.write(f"invalid value for {name}: {value} ({e})\n")
            return
        self.err.write(f"[{name} = {new}]\n")


def read_message(readline, interactive, err):
    """One user message from readline(): a line, or a \"\"\"-delimited block. None at end of input."""
    line = readline("> " if interactive else "")
    if line is None:
        return None
    if line.strip().startswith('"""'):
        first = line.strip()[3:]
        if first.endswith('"""') and len(first) >= 3:
            return first[:-3]
        lines = [first] if first else []
        while True:
            more = readline("... " if interactive else "")
            if more is None:
                break
            if more.rstrip().endswith('"""'):
                lines.append(more.rstrip()[:-3])
                break
            lines.append(more)
        return "\n".join(lines).strip("\n")
    return line


def run_chat(model, system=None, params=None, max_tokens=1024, stdin=None, out=None, err=None):
    # the streams are looked up at call time (not bound at import), so a redirected sys.stdin is honoured
    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    interactive = stdin.isatty()
    session = ChatSession(model, system=system, params=params, out=out, err=err, max_tokens=max_tokens)

    def readline(prompt):
        if interactive:
            try:
                import readline as _  # noqa: F401  (line editing and history for input())
            except ImportError:
                pass
            try:
                return input(prompt)
            except EOFError:
                return None
        line = stdin.readline()
        return None if line == "" else line.rstrip("\n")

    if interactive:
        err.write(f"sparserun chat: {model.path} ({session.formatter.name}). /help for commands, Ctrl-D to leave.\n")
    while True:
        try:
            msg = read_message(readline, interactive, err)
        except KeyboardInterrupt:
            err.write("\n(Ctrl-D or /bye to leave)\n")
            continue
        if msg is None:
            break
        if not msg.strip():
            continue
        if msg.startswith("/"):
            if not session.command(msg.strip()):
                break
            continue
        try:
            stats = session.ask(msg)
        except ContextFullError as e:
            err.write(f"[{e}; /reset to start over]\n")
            continue
        err.write(f"[{stats.line()}]\n")
    return 0
