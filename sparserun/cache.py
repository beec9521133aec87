"""The on-disk cache of neuron packs: one folder per model under $SPARSERUN_CACHE (default ~/.cache/sparserun),
named by the model's tensor fingerprint, holding its packs (ffn_pack.py) and `model.json` (which file it was made
from, when it was last used).

`sparserun cache` lists the entries; `sparserun cache clear [--model M | --all]` removes them. The cache is capped
at $SPARSERUN_CACHE_MAX (a size such as 20G or 500M; default 20G): after a pack is written, the least recently used
other models' entries are removed until the cache fits (the entry in use is never removed).
"""
import json
import os
import shutil
import time

from .errors import SparserunError

DEFAULT_MAX = "20G"
META = "model.json"
UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def root():
    return os.environ.get("SPARSERUN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sparserun")


def parse_size(text):
    """'20G', '500M', '1.5G', '123456' -> bytes."""
    t = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in UNITS else ""
    try:
        value = float(t[:len(t) - len(unit)])
    except ValueError:
        raise SparserunError(f"SPARSERUN_CACHE_MAX: {text!r} is not a size (e.g. 20G, 500M)") from None
    if value < 0:
        raise SparserunError(f"SPARSERUN_CACHE_MAX: {text!r} is negative")
    return int(value * UNITS[unit])


def max_bytes():
    return parse_size(os.environ.get("SPARSERUN_CACHE_MAX", DEFAULT_MAX))


def entry_dir(fingerprint):
    return os.path.join(root(), fingerprint[:32])


def touch(folder, model_path):
    """Record that the entry in folder belongs to model_path and was used now."""
    os.makedirs(folder, exist_ok=True)
    meta = {"model": os.path.abspath(str(model_path)), "last_used": time.time()}
    tmp = os.path.join(folder, META + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(meta, fh)
    os.replace(tmp, os.path.join(folder, META))


def entries():
    """[{folder, model, bytes, files, last_used}] of the cache, most recently used first."""
    base = root()
    out = []
    if not os.path.isdir(base):
        return out
    for name in os.listdir(base):
        folder = os.path.join(base, name)
        if not os.path.isdir(folder):
            continue
        files = [os.path.join(folder, f) for f in os.listdir(folder)]
        files = [f for f in files if os.path.isfile(f)]
        if not any(f.endswith(".npy") or f.endswith(META) for f in files):
            continue  # not ours
        meta = {}
        try:
            with open(os.path.join(folder, META)) as fh:
                meta = json.load(fh)
        except (OSError, ValueError):
            pass
        used = meta.get("last_used") or max((os.path.getmtime(f) for f in files), default=0.0)
        out.append({"folder": folder, "model": meta.get("model", "?"), "bytes": sum(os.path.getsize(f) for f in files),
                    "files": sum(f.endswith(".npy") for f in files), "last_used": float(used)})
    return sorted(out, key=lambda e: -e["last_used"])


def remove(folder):
    shutil.rmtree(folder, ignore_errors=True)


def evict(keep, limit=None):
    """Remove the least recently used entries other than `keep` until the cache holds at most limit bytes (default
    $SPARSERUN_CACHE_MAX). Returns the removed entries."""
    limit = max_bytes() if limit is None else limit
    es = entries()
    total = sum(e["bytes"] for e in es)
    removed = []
    for e in reversed(es):  # oldest first
        if total <= limit:
            break
        if os.path.abspath(e["folder"]) == os.path.abspath(keep):
            continue
        remove(e["folder"])
        total -= e["bytes"]
        removed.append(e)
    return removed


def fmt_bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
