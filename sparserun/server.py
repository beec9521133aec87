"""`sparserun serve`: an OpenAI-compatible HTTP server (Starlette on uvicorn) over one loaded model.

GET /health, GET /v1/models, POST /v1/chat/completions and POST /v1/completions, with streaming as server-sent
events ending in `data: [DONE]`. One model and one KV cache: a single worker thread runs the requests one at a
time in arrival order (no two answers' tokens interleave), and a chat request that extends the previous
conversation reuses its cached prefix (Model.eval keeps the common prefix). A client that disconnects mid-stream
stops its generation at the next token. Bad requests get an OpenAI-style JSON error with a 4xx status.
"""
import asyncio
import json
import queue
import threading
import time
import uuid

from .errors import SparserunError
from .generate import GenerationStats, generate
from .sampling import SamplingParams

# request fields and their types (anything else is ignored, as OpenAI's server ignores unknown fields)
FIELDS = {"model": str, "messages": list, "prompt": (str, list), "max_tokens": int, "max_completion_tokens": int,
          "temperature": (int, float), "top_p": (int, float), "top_k": int, "min_p": (int, float), "stop": (str, list),
          "seed": int, "stream": bool, "repeat_penalty": (int, float), "frequency_penalty": (int, float),
          "presence_penalty": (int, float), "n": int, "user": str}
DEFAULT_MAX_TOKENS = 256


class BadRequest(Exception):
    def __init__(self, message, param=None, code=None, status=400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


def error_body(message, param=None, code=None, kind="invalid_request_error"):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def parse_request(body, chat):
    """Validated fields of a completion request body (a dict): BadRequest on anything OpenAI would refuse."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for name, kind in FIELDS.items():
        v = body.get(name)
        if v is not None and (not isinstance(v, kind) or (kind is int and isinstance(v, bool))):
            raise BadRequest(f"'{name}' has the wrong type ({type(v).__name__})", param=name)
    if chat:
        msgs = body.get("messages")
        if not msgs:
            raise BadRequest("'messages' is required and must not be empty", param="messages")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or \
                    not isinstance(m.get("content"), str):
                raise BadRequest(f"messages[{i}] needs a role (system, user or assistant) and a string content",
                                 param="messages")
    elif not isinstance(body.get("prompt"), str):
        raise BadRequest("'prompt' is required and must be a string", param="prompt")
    n_max = body.get("max_completion_tokens", body.get("max_tokens", DEFAULT_MAX_TOKENS))
    if n_max is None:
        n_max = DEFAULT_MAX_TOKENS
    if n_max < 0:
        raise BadRequest("'max_tokens' must be >= 0", param="max_tokens")
    if body.get("n", 1) != 1:
        raise BadRequest("only n = 1 is supported", param="n")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise BadRequest("'stop' must be a string or up to 4 non-empty strings", param="stop")
    get = lambda k, default: default if body.get(k) is None else body[k]  # noqa: E731 -- JSON null = not given
    params = SamplingParams(temperature=float(get("temperature", 1.0)), top_p=float(get("top_p", 1.0)),
                            top_k=int(get("top_k", 0)), min_p=float(get("min_p", 0.0)),
                            repeat_penalty=float(get("repeat_penalty", 1.0)), seed=body.get("seed"))
    try:
        params.validate()
    except SparserunError as e:
        raise BadRequest(str(e)) from None
    return {"max_tokens": n_max, "stop": stop, "params": params, "stream": bool(body.get("stream", False))}


class Job:
    """One request's generation: its tokens and text pieces go out through `events` (put from the worker thread
    onto the request's event loop); cancel() stops it at the next token."""

    def __init__(self, ids, req, loop):
        self.ids, self.req, self.loop = ids, req, loop
        self.events = asyncio.Queue()
        self.cancelled = threading.Event()
        self.stats = GenerationStats()

    def emit(self, kind, value=None):
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def cancel(self):
        self.cancelled.set()


class Engine:
    """The model and the single thread that runs jobs in arrival order."""

    def __init__(self, model, name):
        from .chat import PromptFormatter

        self.model, self.name = model, name
        self.formatter = PromptFormatter(model)
        self.jobs = queue.Queue()
        self.served = self.cancelled = self.processed = 0  # processed: prompt tokens computed (cached ones not)
        threading.Thread(target=self._run, daemon=True, name="sparserun-generate").start()

    def prompt_ids(self, req_body, chat):
        if chat:
            ids, stops = self.formatter.tokens(req_body["messages"])
        else:
            ids, stops = self.model.tokenize(req_body["prompt"]), []
        return ids, stops

    def _run(self):
        while True:
            job = self.jobs.get()
            try:
                self._generate(job)
            except Exception as e:  # noqa: BLE001 -- reported to the client, the worker lives on
                job.emit("error", str(e).splitlines()[0] if str(e) else type(e).__name__)
            finally:
                job.emit("done")

    def _generate(self, job):
        r, p = job.req, job.req["params"]
        text, shown = "", 0
        hold = max((len(s) - 1 for s in r["stop"]), default=0)
        gen = generate(self.model, job.ids, max_tokens=r["max_tokens"], stats=job.stats, temperature=p.temperature,
                       top_k=p.top_k, top_p=p.top_p, min_p=p.min_p, repeat_penalty=p.repeat_penalty, seed=p.seed,
                       context_shift=True)
        try:
            for piece in gen:
                if job.cancelled.is_set():
                    job.stats.stop_reason = "cancelled"
                    self.cancelled += 1
                    return
                text += piece
                cut = min((text.find(s) for s in r["stop"] if s in text), default=-1)
                if cut >= 0:
                    text = text[:cut]
                    job.stats.stop_reason = "stop"
                    break
                safe = max(shown, len(text) - hold)
                if safe > shown:
                    job.emit("text", text[shown:safe])
                    shown = safe
        finally:
            gen.close()
            self.processed += job.stats.prompt_tokens
        if shown < len(text):
            job.emit("text", text[shown:])
        self.served += 1


def finish_reason(stats):
    return "length" if stats.stop_reason in ("length", "context") else "stop"


def make_app(engine):
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    model = engine.model

    async def health(request):
        return JSONResponse({"status": "ok", "model": engine.name, "served": engine.served,
                             "cancelled": engine.cancelled, "queued": engine.jobs.qsize(),
                             "prompt_tokens_processed": engine.processed})

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": engine.name, "object": "model", "created": 0,
                                                         "owned_by": "sparserun"}]})

    def bad(e):
        return JSONResponse(error_body(str(e), e.param, e.code), status_code=e.status)

    async def completion(request, chat):
        try:
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise BadRequest("the request body is not valid JSON") from None
            req = parse_request(body, chat)
            ids, template_stops = engine.prompt_ids(body, chat)
            req["stop"] = req["stop"] + [s for s in template_stops if s not in req["stop"]]
            if len(ids) + 1 > model.n_ctx:
                raise BadRequest(f"the prompt is {len(ids)} tokens; this server's context is {model.n_ctx}",
                                 param="messages" if chat else "prompt", code="context_length_exceeded")
        except BadRequest as e:
            return bad(e)
        except ClientDisconnect:
            return JSONResponse(error_body("client disconnected"), status_code=400)
        job = Job(ids, req, asyncio.get_running_loop())
        engine.jobs.put(job)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def usage():
            n = job.stats.gen_tokens
            return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

        def chunk(text=None, finish=None, first=False):
            if chat:
                delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish}
            return {"id": rid, "object": obj + (".chunk" if chat else ""), "created": created, "model": engine.name,
                    "choices": [choice]}

        if req["stream"]:
            async def events():
                try:
                    if chat:
                        yield f"data: {json.dumps(chunk(first=True))}\n\n"
                    while True:
                        kind, value = await job.events.get()
                        if kind == "text":
                            yield f"data: {json.dumps(chunk(value))}\n\n"
                        elif kind == "error":
                            yield f"data: {json.dumps(error_body(value, kind='server_error'))}\n\n"
                        elif kind == "done":
                            last = chunk(finish=finish_reason(job.stats))
                            last["usage"] = usage()
                            yield f"data: {json.dumps(last)}\n\n"
                            yield "data: [DONE]\n\n"
                            return
                finally:
                    job.cancel()  # a disconnected client: the worker stops at its next token

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        text, error = "", None
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                text += value
            elif kind == "error":
                error = value
            elif kind == "done":
                break
        if error is not None:
            return JSONResponse(error_body(error, kind="server_error"), status_code=500)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                  else {"index": 0, "text": text})
        choice["finish_reason"] = finish_reason(job.stats)
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": engine.name,
                             "choices": [choice], "usage": usage()})

    async def chat_completions(request):
        return await completion(request, True)

    async def completions(request):
        return await completion(request, False)

    return Starlette(routes=[Route("/health", health), Route("/v1/models", models),
                             Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                             Route("/v1/completions", completions, methods=["POST"])])


def serve(model, name, host="127.0.0.1", port=8080, log_level="warning"):
    import uvicorn

    app = make_app(Engine(model, name))
    uvicorn.run(app, host=host, port=port, log_level=log_level)
