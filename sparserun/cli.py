"""The `sparserun` command line (typer). Every user error is one line on stderr and exit code 2."""
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import SparserunError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run GGUF language models fast on a CPU, computing only the FFN neurons that matter.")

ModelArg = typer.Argument(..., help="path to a GGUF model file", show_default=False)
DefaultModelArg = typer.Argument(None, help="path to a GGUF model file (default: the project's own storyteller, "
                                 "models/storyteller.gguf, or $SPARSERUN_MODEL)", show_default=False)


def default_model():
    """$SPARSERUN_MODEL, else the demo model that ships in the repository's models/ (an editable install)."""
    import os

    env = os.environ.get("SPARSERUN_MODEL")
    p = Path(env) if env else Path(__file__).resolve().parent.parent / "models" / "storyteller.gguf"
    if not p.is_file():
        raise SparserunError(f"{p}: no model given and the default model is missing (pass a GGUF path)")
    return p
Threads = typer.Option(None, "--threads", "-t", help="CPU threads (default: physical cores)")
Ctx = typer.Option(2048, "--ctx", "-c", help="context size in tokens")
KvType = typer.Option("f16", "--kv-type", help="KV cache type: f16 (as llama.cpp) or f32 (exact, twice the memory)")
CheckTensors = typer.Option(False, "--check-tensors", help="check every tensor's values are finite at load (as "
                            "llama.cpp's --check-tensors)")
Sparsity = typer.Option(None, "--sparsity", help="FFN sparsity: dense | topk:K (count or fraction, or one per layer "
                        "comma-separated) | threshold:T (value, per-layer values, or a thresholds JSON file) | "
                        "predictor[:FILE|:T] | teal:S|FILE (input sparsity on every matrix; teal:S+POLICY: attention only); "
                        "default dense, or a PowerInfer file's own predictors")


Device = typer.Option(None, "--device", help="cpu | cuda | auto (default: auto with --vram-budget or --placement, "
                      "else cpu); auto falls back to the CPU with one line when no CUDA GPU works")
VramBudget = typer.Option(None, "--vram-budget", help="GiB of GPU memory for hot neurons, attention and output head "
                          "(placed on the fly from <model>.gguf.profile.gguf or --profile); default with a GPU: all")
PlacementOpt = typer.Option(None, "--placement", help="a placement file from `sparserun place` (instead of planning)")
ProfileOpt = typer.Option(None, "--profile", help="profile that ranks neurons for an on-the-fly placement and the "
                          "hot output head's tokens (default: <model>.gguf.profile.gguf when it exists)")
TraceOpt = typer.Option(None, "--trace", help="write which parts of the model ran for each token (kept share of each "
                        "FFN and matrix per layer) to this file, as JSON lines")
TraceIds = typer.Option(False, "--trace-ids", help="with --trace: also each layer's kept neuron ids")
HeadOpt = typer.Option("dense", "--head", help="output head: dense | hot[:K] (K rows exact every token, the rest "
                       "estimated and the best of them computed; see `sparserun bench --head`)")


def _load(model, threads, ctx, sparsity=None, device=None, vram_budget=None, placement=None, profile=None,
          kv_type="f16", check_tensors=False, head="dense"):
    from . import kernels
    from .model import load
    from .sparsity import parse_sparsity

    policy = parse_sparsity(sparsity) if sparsity is not None else None  # a bad spec fails before anything loads
    for f in (placement, profile):
        if f is not None and not Path(f).is_file():
            raise SparserunError(f"{f}: no such file")
    if not kernels.cache_is_warm():
        sys.stderr.write("sparserun: compiling numba kernels (first start only; cached for the next runs)...\n")
    m = load(model, threads=threads, n_ctx=ctx, sparsity=policy, device=device, vram_budget=vram_budget,
             placement=placement, profile=profile, kv_type=kv_type, check_tensors=check_tensors, head=head)
    if sparsity is None and not m.policy.is_dense:
        sys.stderr.write("sparserun: PowerInfer file: running its own predictors (--sparsity dense computes every "
                         "neuron)\n")
    if m.head is not None:
        sys.stderr.write(f"sparserun: {m.head.describe()}\n")
    if m.placement is not None:
        sys.stderr.write(f"sparserun: hybrid CPU/GPU: {m.placement.summary()}\n")
    return m


def _sampling(temp, top_k, top_p, min_p, repeat_penalty, seed):
    from .sampling import SamplingParams

    return SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                          seed=seed).validate()


@app.command()
def info(model: Path = ModelArg, json_out: bool = typer.Option(False, "--json", help="print JSON")):
    """Architecture, parameter count, size, quant mix, hyperparameters and activation of a GGUF."""
    import json

    from .info import file_info, format_info

    info = file_info(model)
    typer.echo(json.dumps(info, indent=2) if json_out else format_info(info))


@app.command()
def generate(
    model: Optional[Path] = DefaultModelArg,
    prompt: str = typer.Option("", "--prompt", "-p", help="prompt text (control tokens like <s> are parsed)"),
    n: int = typer.Option(128, "--n-predict", "-n", help="tokens to generate"),
    temp: float = typer.Option(0.8, "--temp", help="temperature; 0 = greedy"),
    top_k: int = typer.Option(40, "--top-k", help="keep the k most probable tokens (0 = off)"),
    top_p: float = typer.Option(0.95, "--top-p", help="nucleus sampling mass (1 = off)"),
    min_p: float = typer.Option(0.05, "--min-p", help="drop tokens below min_p x the top probability (0 = off)"),
    repeat_penalty: float = typer.Option(1.0, "--repeat-penalty", help="penalty for recent tokens (1 = off)"),
    seed: Optional[int] = typer.Option(None, "--seed", "-s", help="random seed (default: random)"),
    threads: Optional[int] = Threads,
    ctx: int = Ctx,
    kv_type: str = KvType,
    check_tensors: bool = CheckTensors,
    sparsity: Optional[str] = Sparsity,
    timing: bool = typer.Option(True, "--timing/--no-timing", help="print a tokens/s line on stderr at the end"),
    device: Optional[str] = Device,
    vram_budget: Optional[float] = VramBudget,
    placement: Optional[Path] = PlacementOpt,
    profile: Optional[Path] = ProfileOpt,
    head: str = HeadOpt,
    trace: Optional[Path] = TraceOpt,
    trace_ids: bool = TraceIds,
):
    """Continue a prompt, streaming the text to stdout."""
    from .generate import GenerationStats

    params = _sampling(temp, top_k, top_p, min_p, repeat_penalty, seed)
    if n < 0:
        raise SparserunError(f"--n-predict must be >= 0, got {n}")
    m = _load(model or default_model(), threads, ctx, sparsity, device, vram_budget, placement, profile, kv_type,
              check_tensors, head)
    stats = GenerationStats()
    if trace is not None:
        m.start_trace(trace, trace_ids)
    sys.stdout.write(prompt)
    try:
        for piece in m.generate(prompt, max_tokens=n, stats=stats, **params.__dict__):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stats.stop_reason = "interrupted"
    finally:
        m.stop_trace()
    sys.stdout.write("\n")
    if stats.stop_reason == "context":
        sys.stderr.write(f"[stopped: context of {ctx} tokens is full; raise --ctx]\n")
    if timing:
        sys.stderr.write(f"[{stats.line()}]\n")


@app.command()
def chat(
    model: Optional[Path] = DefaultModelArg,
    system: Optional[str] = typer.Option(None, "--system", help="system prompt"),
    temp: float = typer.Option(0.8, "--temp", help="temperature; 0 = greedy"),
    top_k: int = typer.Option(40, "--top-k"),
    top_p: float = typer.Option(0.95, "--top-p"),
    min_p: float = typer.Option(0.05, "--min-p"),
    repeat_penalty: float = typer.Option(1.1, "--repeat-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed", "-s"),
    max_tokens: int = typer.Option(1024, "--n-predict", "-n", help="longest answer in tokens"),
    threads: Optional[int] = Threads,
    ctx: int = Ctx,
    kv_type: str = KvType,
    check_tensors: bool = CheckTensors,
    sparsity: Optional[str] = Sparsity,
    device: Optional[str] = Device,
    vram_budget: Optional[float] = VramBudget,
    placement: Optional[Path] = PlacementOpt,
    profile: Optional[Path] = ProfileOpt,
    head: str = HeadOpt,
    trace: Optional[Path] = TraceOpt,
    trace_ids: bool = TraceIds,
):
    """Chat with a model: /help for commands, \"\"\" for multi-line input, Ctrl-C stops an answer.

    Works with piped input too: each line (or \"\"\" block) is one user message."""
    from .chat import run_chat

    params = _sampling(temp, top_k, top_p, min_p, repeat_penalty, seed)
    m = _load(model or default_model(), threads, ctx, sparsity, device, vram_budget, placement, profile, kv_type,
              check_tensors, head)
    if trace is not None:
        m.start_trace(trace, trace_ids)
    try:
        run_chat(m, system=system, params=params, max_tokens=max_tokens)
    finally:
        m.stop_trace()


@app.command()
def serve(
    model: Optional[Path] = DefaultModelArg,
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on (loopback unless told otherwise)"),
    port: int = typer.Option(8080, "--port"),
    alias: Optional[str] = typer.Option(None, "--alias", help="the model's id in the API (default: the file name)"),
    threads: Optional[int] = Threads,
    ctx: int = Ctx,
    kv_type: str = KvType,
    check_tensors: bool = CheckTensors,
    sparsity: Optional[str] = Sparsity,
    device: Optional[str] = Device,
    vram_budget: Optional[float] = VramBudget,
    placement: Optional[Path] = PlacementOpt,
    profile: Optional[Path] = ProfileOpt,
    head: str = HeadOpt,
):
    """An OpenAI-compatible server: /v1/chat/completions, /v1/completions, /v1/models, /health."""
    from .server import serve as run_server

    import socket

    if not 0 < port < 65536:
        raise SparserunError(f"--port must be in 1..65535, got {port}")
    try:  # a taken port or an unknown host: one line before the model loads, not uvicorn's log and exit code 1
        with socket.create_server((host, port)):
            pass
    except OSError as e:
        raise SparserunError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    path = model or default_model()
    m = _load(path, threads, ctx, sparsity, device, vram_budget, placement, profile, kv_type, check_tensors, head)
    name = alias or Path(path).name
    sys.stderr.write(f"sparserun: serving {name} on http://{host}:{port}/v1 (OpenAI API), Ctrl-C to stop\n")
    run_server(m, name, host=host, port=port)


cache_app = typer.Typer(help="The neuron-pack cache: list its entries (the default) or clear them.",
                        invoke_without_command=True, no_args_is_help=False)
app.add_typer(cache_app, name="cache")


@cache_app.callback()
def cache_list(ctx: typer.Context):
    """List the cache's entries: model, size, packs, last used (most recent first)."""
    if ctx.invoked_subcommand is not None:
        return
    import time

    from . import cache

    es = cache.entries()
    total = sum(e["bytes"] for e in es)
    print(f"{cache.root()}: {len(es)} models, {cache.fmt_bytes(total)} "
          f"(cap {cache.fmt_bytes(cache.max_bytes())}, $SPARSERUN_CACHE_MAX)")
    for e in es:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_used"]))
        print(f"  {cache.fmt_bytes(e['bytes']):>10}  {e['files']:>3} packs  {used}  {e['model']}")


@cache_app.command("clear")
def cache_clear(model: Optional[Path] = typer.Option(None, "--model", help="remove this model's entry"),
                all_: bool = typer.Option(False, "--all", help="remove every entry")):
    """Remove one model's entry (--model M) or all of them (--all)."""
    from . import cache

    if (model is None) == (not all_):
        raise SparserunError("cache clear: say --model MODEL or --all")
    if all_:
        es = cache.entries()
    else:
        from .gguf_file import GGUFFile

        folder = cache.entry_dir(GGUFFile(model).fingerprint())
        es = [e for e in cache.entries() if e["folder"] == folder]
    for e in es:
        cache.remove(e["folder"])
    print(f"removed {len(es)} entr{'y' if len(es) == 1 else 'ies'}, {cache.fmt_bytes(sum(e['bytes'] for e in es))}")


@app.command()
def bench(
    model: Path = ModelArg,
    n_prompt: int = typer.Option(64, "-p", "--n-prompt", help="prompt-processing test length (0 = skip)"),
    n_gen: int = typer.Option(32, "-n", "--n-gen", help="decode test length (0 = skip)"),
    depth: int = typer.Option(0, "-d", "--depth", help="tokens of context already in the KV cache before each test"),
    reps: int = typer.Option(3, "-r", "--repetitions", help="repetitions (interleaved across modes)"),
    modes: str = typer.Option("dense,sparse,llama.cpp", "--modes", help="comma-separated: dense, sparse, llama.cpp, "
                              "hybrid:F (F of the model on the GPU, 0 < F <= 1; the first --sparsity policy)"),
    sparsity: list[str] = typer.Option(["threshold:0"], "--sparsity",
                                       help="policy of the sparse mode; repeat for several sparse modes"),
    heads: list[str] = typer.Option([], "--head", help="also bench the dense FFN with this output head (hot[:K]); "
                                    "repeat for several"),
    text: Optional[Path] = typer.Option(None, "--text", help="text for the fidelity figures (default: built in)"),
    fidelity_tokens: int = typer.Option(64, "--fidelity-tokens", help="tokens of the text used for fidelity (0: skip the fidelity pass)"),
    threads: Optional[int] = Threads,
    output: str = typer.Option("md", "-o", "--output", help="md, csv or json"),
    json_file: Optional[Path] = typer.Option(None, "--json", help="also write every figure to this JSON file"),
    llama_cpp_model: Optional[Path] = typer.Option(None, "--llama-cpp-model", help="the file llama.cpp runs instead "
                                                   "(a PowerInfer PWRI model's weights as a plain GGUF)"),
    trace: Optional[Path] = typer.Option(None, "--trace", help="write the first sparse (or hot-head) mode's fidelity "
                                         "pass, token by token, as a trace (see generate --trace)"),
    trace_ids: bool = TraceIds,
):
    """Tokens/s of this engine (dense and sparse) and of llama.cpp on the same file, llama-bench style,
    with fidelity of each sparse mode against dense (top-1 agreement, KL, kept fraction)."""
    import json

    from .bench import format_table, run_bench
    from .progress import stderr_progress
    from .gguf_file import GGUFFile

    if output not in ("md", "csv", "json"):
        raise SparserunError(f"-o must be md, csv or json, got {output!r}")
    from .sparsity import parse_sparsity

    GGUFFile(model)  # a bad file or spec fails here with its one-line error, before anything loads
    if llama_cpp_model is not None:
        GGUFFile(llama_cpp_model)
    for spec in sparsity:
        parse_sparsity(spec)
    if text is not None and not text.is_file():
        raise SparserunError(f"{text}: no such text file")
    res = run_bench(model, [x.strip() for x in modes.split(",") if x.strip()], n_prompt, n_gen, reps, threads,
                    sparsity=sparsity, text=text.read_text(errors="replace") if text else None,
                    fidelity_tokens=fidelity_tokens, progress=stderr_progress, depth=depth, heads=heads,
                    llama_cpp_model=llama_cpp_model, trace=trace, trace_ids=trace_ids)
    typer.echo(format_table(res, output))
    if json_file:
        json_file.write_text(json.dumps(res, indent=2))


@app.command()
def perplexity(
    model: Path = ModelArg,
    text: Path = typer.Option(..., "-f", "--file", help="text file to score (held-out text)"),
    ctx: int = typer.Option(512, "--ctx", "-c", help="tokens per chunk (the second half of each is scored)"),
    chunks: Optional[int] = typer.Option(None, "--chunks", help="score at most this many chunks"),
    threads: Optional[int] = Threads,
    sparsity: Optional[str] = Sparsity,
    head: str = HeadOpt,
    profile: Optional[Path] = ProfileOpt,
    llama_cpp: bool = typer.Option(False, "--llama-cpp", help="also score the same chunks with llama.cpp (dense)"),
):
    """Perplexity over a text, chunked and scored as llama.cpp's llama-perplexity does."""
    from .perplexity import chunk_tokens, llama_cpp_perplexity, model_perplexity, summary

    if not text.is_file():
        raise SparserunError(f"{text}: no such text file")
    m = _load(model, threads, ctx, sparsity, profile=profile, head=head)
    ids = m.tokenize(text.read_text(errors="replace"), special=False)  # as llama-perplexity: control text stays text
    parts = chunk_tokens(ids, ctx, chunks, m.tokenizer.bos_id)
    typer.echo(f"perplexity: {len(parts)} chunks of {ctx} tokens, the last {ctx - 1 - ctx // 2} of each scored "
               f"({len(ids)} tokens in the text); sparsity {m.policy.spec}, head {head}")

    def show(i, ppl):
        sys.stdout.write(f"[{i + 1}]{ppl:.4f},")
        sys.stdout.flush()

    ppl, err = summary(model_perplexity(m, parts, show))
    typer.echo(f"\nFinal estimate: PPL = {ppl:.4f} +/- {err:.5f}")
    if llama_cpp:
        typer.echo("llama.cpp on the same chunks:")
        ref, ref_err = summary(llama_cpp_perplexity(model, parts, m.threads, show))
        typer.echo(f"\nllama.cpp: PPL = {ref:.4f} +/- {ref_err:.5f}; sparserun / llama.cpp = {ppl / ref:.4f}")


def _corpus_ids(m, corpus, tokens):
    if not corpus.is_file():
        raise SparserunError(f"{corpus}: no such corpus file")
    ids = m.tokenize(corpus.read_text(errors="replace"))[:tokens]
    if len(ids) < 8:
        raise SparserunError(f"{corpus}: too little text ({len(ids)} tokens)")
    return ids


@app.command()
def calibrate(
    model: Path = ModelArg,
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="text file to calibrate on"),
    profile: Optional[Path] = typer.Option(None, "--profile", help="or: a profile from `sparserun profile`"),
    sparsity: float = typer.Option(0.5, "--target-sparsity", help="fraction of FFN activations to drop, per layer"),
    tokens: int = typer.Option(2048, "--tokens", help="calibration tokens to use at most"),
    out: Optional[Path] = typer.Option(None, "-o", "--output", help="thresholds file to write (default: thresholds.json; "
                                       "with --teal: <model>.gguf.teal.gguf)"),
    teal: bool = typer.Option(False, "--teal", help="input thresholds for every matrix (--sparsity teal:FILE): "
                              "--target-sparsity is the share of weight bytes skipped; from a profile's teal tables "
                              "(--profile) or a corpus (default: Python's documentation text)"),
    allocation: str = typer.Option("greedy", "--allocation", help="with --teal: greedy (per layer, the share spread "
                                   "over the inputs by the error each adds) or uniform (every input at the target)"),
    threads: Optional[int] = Threads,
):
    """Per-layer thresholds for a target FFN sparsity, for --sparsity threshold:FILE (--teal: teal:FILE)."""
    from .calibrate import calibrate_thresholds
    from .sparsity import save_thresholds

    if teal:
        from .side_files import PROFILE, TEAL
        from .teal import GROUPS, builtin_text, load_tables, save_teal, teal_tables

        if corpus is not None and profile is not None:
            raise SparserunError("calibrate --teal takes --corpus or --profile, not both")
        if profile is not None:  # the profile's tables: no pass over text
            from .model import Model

            m = Model(model, n_ctx=1)
            tables = load_tables(profile, m, PROFILE)
            if tables is None:
                raise SparserunError(f"{profile}: this profile holds no teal tables (made with --no-teal)")
        else:
            m = _load(model, threads, max(tokens, 8))
            ids = _corpus_ids(m, corpus, tokens) if corpus is not None else m.tokenize(builtin_text())[:tokens]
            tables = teal_tables(m, ids, allocation != "uniform", text=str(corpus or "pydoc_data.topics"))
        t, shares = tables.select(sparsity, allocation)
        out = out or Path(TEAL.default_path(model))
        save_teal(out, m, t, tables, target=sparsity, allocation=allocation)
        typer.echo(f"wrote {out}: teal thresholds ({allocation}) for {sparsity:.0%} of the weight bytes over "
                   f"{tables.tokens} tokens of {tables.text}; mean share of channels dropped per input: " +
                   ", ".join(f"{name} {v:.2f}" for name, v in zip(GROUPS, shares.mean(0))))
        return
    out = out or Path("thresholds.json")
    if (corpus is None) == (profile is None):
        raise SparserunError("calibrate needs exactly one of --corpus or --profile")
    if not 0.0 <= sparsity < 1.0:
        raise SparserunError(f"--target-sparsity must be in [0, 1), got {sparsity}")
    if profile is not None:
        from .model import Model
        from .profile import load_profile

        m = Model(model, n_ctx=1)
        p = load_profile(profile, m)
        t, n = p.threshold_for(sparsity), p.tokens
    else:
        m = _load(model, threads, max(tokens, 8))
        ids = _corpus_ids(m, corpus, tokens)
        t, n = calibrate_thresholds(m, ids, sparsity), len(ids)
    save_thresholds(out, t, target_sparsity=sparsity, tokens=n, model_fingerprint=m.gguf.fingerprint())
    typer.echo(f"wrote {out}: {len(t)} thresholds for {sparsity:.0%} FFN sparsity over {n} tokens "
               f"(min {min(t):.4g}, max {max(t):.4g})")


@app.command()
def profile(
    model: Path = ModelArg,
    corpus: Optional[Path] = typer.Option(None, "--corpus", help="text file to run the model over"),
    tokens: int = typer.Option(4096, "--tokens", help="tokens of the corpus to use at most"),
    out: Optional[Path] = typer.Option(None, "-o", "--output", help="profile file (default: <model>.gguf.profile.gguf)"),
    sparsity: float = typer.Option(0.5, "--target-sparsity",
                                   help="SwiGLU: 'active' means above the thresholds for this sparsity"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="also draw the hotness picture and CDF to this PNG"),
    teal: bool = typer.Option(True, "--teal/--no-teal", help="also calibrate the input sparsity (teal:S then selects "
                              "its thresholds from this profile)"),
    threads: Optional[int] = Threads,
    trace: Optional[Path] = typer.Option(None, "--trace", help="instead of profiling: draw this trace's layer x token "
                                         "heat map of kept shares (from generate / chat / bench --trace) to --plot"),
):
    """Neuron hotness over a corpus: per-neuron activity and mean magnitude, per-layer histograms, the hot head's token
    counts, and the input sparsity's calibration (teal:S reads it from the profile beside the model)."""
    from .profile import format_summary, plot_profile, profile_model, save_profile
    from .progress import stderr_progress
    from .side_files import PROFILE

    if trace is not None:
        from .gguf_file import GGUFFile
        from .trace import plot_trace

        if plot is None:
            raise SparserunError("--trace draws a picture: give --plot FILE.png")
        m = plot_trace(trace, plot, GGUFFile(model).fingerprint())
        typer.echo(f"wrote {plot} ({m.shape[0]} layers x {m.shape[1]} tokens)")
        return
    if corpus is None:
        raise SparserunError("profile needs --corpus (a text file to run the model over)")
    if not 0.0 <= sparsity < 1.0:
        raise SparserunError(f"--target-sparsity must be in [0, 1), got {sparsity}")
    m = _load(model, threads, 256)  # (teal's calibration runs its text in a context of its own)
    ids = _corpus_ids(m, corpus, tokens)
    p = profile_model(m, ids, target_sparsity=sparsity, progress=stderr_progress, teal=teal, text=str(corpus))
    out = out or Path(PROFILE.default_path(model))
    save_profile(p, out)
    typer.echo(format_summary(p))
    typer.echo(f"wrote {out}")
    if plot is not None:
        plot_profile(p, plot)
        typer.echo(f"wrote {plot}")


@app.command()
def place(
    model: Path = ModelArg,
    profile: Optional[Path] = typer.Option(None, "--profile", help="neuron hotness (default: <model>.gguf.profile.gguf)"),
    vram_budget: float = typer.Option(..., "--vram-budget", help="GiB of GPU memory to fill"),
    out: Optional[Path] = typer.Option(None, "-o", "--output", help="placement file (default: <model>.gguf.placement.gguf)"),
    sparsity: Optional[str] = typer.Option(None, "--sparsity", help="the policy the placement serves: without a profile, "
                                           "each neuron's hotness is measured under its keep rule on a built-in text"),
    predictor: bool = typer.Option(False, "--for-predictor", help="plan for the predictor policy (no dense CPU gate)"),
):
    """Decide which neurons, attention blocks and output head go to the GPU under a VRAM budget."""
    from .hybrid import make_placement
    from .model import Model
    from .placement import device_bytes, save_placement
    from .side_files import PLACEMENT, PROFILE
    from .sparsity import parse_sparsity

    if vram_budget < 0:
        raise SparserunError(f"--vram-budget must be >= 0 GiB, got {vram_budget}")
    if profile is not None and not profile.is_file():
        raise SparserunError(f"{profile}: no such profile file")
    if profile is None and not Path(PROFILE.default_path(model)).is_file() and sparsity is None:
        raise SparserunError(f"no profile: run `sparserun profile {model} --corpus FILE` first, pass --profile, or "
                             "give --sparsity to measure the neurons' hotness under that policy")
    m = Model(model, n_ctx=1)  # the plan counts no KV cache: the file serves any context
    p = make_placement(m, vram_budget, profile=profile, gate_dense=False if predictor else None,
                       policy=parse_sparsity(sparsity) if sparsity is not None else None)
    out = out or Path(PLACEMENT.default_path(model))
    save_placement(p, out)
    typer.echo(f"{p.summary()} (the whole model on the device: {device_bytes(m) / 2**30:.3f} GiB)")
    for li, g in enumerate(p.gpu_neurons):
        typer.echo(f"  layer {li:2d}: {len(g):6d} of {m.args.n_ff} neurons on GPU, attention "
                   f"{'GPU' if p.attn_gpu[li] else 'CPU'}")
    typer.echo(f"wrote {out}")


@app.command("train-predictors")
def train_predictors_cmd(
    model: Path = ModelArg,
    corpus: Path = typer.Option(..., "--corpus", help="text file to collect activations from"),
    tokens: int = typer.Option(2048, "--tokens", help="tokens of the corpus to use at most (60/20/20 split)"),
    out: Optional[Path] = typer.Option(None, "-o", "--output", help="predictor file (default: <model>.gguf.predictors.gguf)"),
    recall: float = typer.Option(0.95, "--target-recall", help="fraction of true activations to keep"),
    form: str = typer.Option("sparserun", "--form", help="sparserun (biases, the FFN's normalized input) or powerinfer "
                             "(PowerInfer's: no biases, the residual input; for export-powerinfer)"),
    sparsity: float = typer.Option(0.5, "--target-sparsity", help="SwiGLU: 'active' means above this sparsity's thresholds"),
    epochs: int = typer.Option(30, "--epochs"),
    threads: Optional[int] = Threads,
):
    """Train per-layer low-rank activation predictors on the model's own activations."""
    from predictors.train import format_report, train_predictors

    from .progress import stderr_progress
    from .side_files import PREDICTORS

    m = _load(model, threads, 256)
    ids = _corpus_ids(m, corpus, tokens)

    def progress(done, total, row):
        stderr_progress(done, total, f"layer {done}/{total}: rank {row['rank']}, held-out recall {row['recall']:.3f}, "
                                     f"predicted density {row['predicted_density']:.3f}")

    pset, report = train_predictors(m, ids, target_recall=recall, sparsity=sparsity, epochs=epochs, progress=progress,
                                    form=form)
    out = out or Path(PREDICTORS.default_path(model))
    pset.save(out)
    typer.echo(format_report(report))
    typer.echo(f"wrote {out} (held-out figures: the last 20% of the {len(ids)} tokens)")


@app.command("export-powerinfer")
def export_powerinfer(
    model: Path = ModelArg,
    predictors: Optional[Path] = typer.Option(None, "--predictors", help="predictors trained with --form powerinfer "
                                              "(default: <model>.gguf.predictors.gguf)"),
    out: Path = typer.Option(..., "-o", "--output", help="the PWRI file to write (PowerInfer names them *.powerinfer.gguf)"),
):
    """Write a ReLU llama / bamboo model and its predictors as PowerInfer's PWRI file (PowerInfer and sparserun both
    run it)."""
    from predictors.format import load_predictors

    from .powerinfer import export
    from .side_files import PREDICTORS

    m = _load(model, None, 8)
    pset = load_predictors(str(predictors or PREDICTORS.default_path(model)), m)
    threshold, per_layer = export(m, pset, out)
    typer.echo(f"wrote {out}: powerinfer.sparse_threshold {threshold:g} (per layer, as trained: "
               f"{', '.join(f'{t:.3g}' for t in per_layer)})")


def main(argv=None):
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="sparserun")
        return rv if isinstance(rv, int) else 0
    except SparserunError as e:
        sys.stderr.write(f"sparserun: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130
    except Exception as e:
        # usage errors (bad option values...): typer raises click-style exceptions from its own vendored
        # click, so they are recognised by shape rather than by class
        if hasattr(e, "show") and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            return e.exit_code
        if type(e).__name__ == "Abort":
            sys.stderr.write("\n")
            return 130
        raise
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
