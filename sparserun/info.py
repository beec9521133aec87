"""`sparserun info`: what a GGUF holds, from metadata and tensor headers only (no weights read, no kernels loaded)."""
from collections import Counter

from .arch import ROPE_NEOX


def file_info(path):
    """info of the GGUF at path without loading it (the header, the tensor table, the architecture's ModelArgs)."""
    from .arch import model_args
    from .gguf_file import GGUFFile

    f = GGUFFile(path)
    return model_info(f, model_args(f), str(path))


def model_info(f, a, path):
    types = f.tensor_types()
    by_bytes = Counter()
    for name in f.tensor_names:
        by_bytes[types[name]] += f.tensor(name).n_bytes
    return {
        "file": path,
        "architecture": a.arch,
        "name": f.get("general.name", ""),
        "parameters": f.n_params(),
        "file_bytes": f.file_size,
        "quant_mix": {t: {"tensors": n, "bytes": by_bytes[t]} for t, n in Counter(types.values()).most_common()},
        "layers": a.n_layer, "dim": a.dim, "ffn_dim": a.n_ff, "heads": a.n_head, "kv_heads": a.n_head_kv,
        "head_dim": a.head_dim, "vocab": a.n_vocab, "context_train": a.n_ctx_train,
        "rope_base": a.rope_base, "rope_dim": a.rope_dim, "norm_eps": a.norm_eps,
        "activation": a.activation + (" (gated)" if a.gated else ""),
        "tied_output": a.tied_output,
        "rope_type": "neox" if a.rope_type == ROPE_NEOX else "normal",
        "features": list(a.features),
        "chat_template": "yes" if f.get("tokenizer.chat_template") else "no",
        "powerinfer": powerinfer_info(f, a),
    }


def powerinfer_info(f, a):
    """What a PowerInfer (PWRI) file carries beyond the model, or None for a plain GGUF."""
    from . import powerinfer

    if not f.powerinfer:
        return None
    out = {"ffn_down_t": a.down_t, "predictors": None}
    if powerinfer.has_predictors(f):
        fc1 = [f.tensor(f"blk.{i}.fc1.weight") for i in range(a.n_layer)]
        out["predictors"] = {"ranks": sorted({t.rows for t in fc1}), "type": fc1[0].type_name,
                             "threshold": powerinfer.file_threshold(f),
                             "bytes": sum(t.n_bytes + f.tensor(f"blk.{i}.fc2.weight").n_bytes for i, t in enumerate(fc1))}
    return out


def format_info(info):
    mix = ", ".join(f"{t} x{v['tensors']} ({v['bytes'] / 2**20:.1f} MiB)" for t, v in info["quant_mix"].items())
    rows = [
        ("file", info["file"]), ("architecture", info["architecture"]), ("name", info["name"]),
        ("parameters", f"{info['parameters'] / 1e6:.2f} M"), ("size", f"{info['file_bytes'] / 2**20:.1f} MiB"),
        ("quant mix", mix), ("layers", info["layers"]), ("dim / ffn", f"{info['dim']} / {info['ffn_dim']}"),
        ("heads / kv heads / head dim", f"{info['heads']} / {info['kv_heads']} / {info['head_dim']}"),
        ("vocab", info["vocab"]), ("context (train)", info["context_train"]),
        ("rope base / dims / type", f"{info['rope_base']:g} / {info['rope_dim']} / {info['rope_type']}"), ("rms eps", f"{info['norm_eps']:g}"),
        ("ffn activation", info["activation"]), ("tied output", info["tied_output"]),
        ("features", ", ".join(info["features"]) or "none (llama's block)"),
        ("chat template", info["chat_template"]),
    ]
    pi = info.get("powerinfer")
    if pi is not None:
        p = pi["predictors"]
        rows.append(("PowerInfer (PWRI)", "ffn_down stored transposed (ffn_down_t); " + (
            f"predictors fc1/fc2 of rank {'/'.join(map(str, p['ranks']))} in {p['type']} ({p['bytes'] / 2**20:.1f} MiB), "
            f"threshold {p['threshold']:g} (--sparsity predictor runs them)" if p else "no predictors")))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
