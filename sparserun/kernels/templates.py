"""Kernels stamped out from one body for several row layouts or head widths, defined so that numba's on-disk cache
finds them again in the next process.

A kernel made by a closure (a factory returning an inner @njit function that calls the intrinsic it was given) is
never found in numba's cache: the cache key includes the pickled closure variables, and an intrinsic pickles with
a per-process identifier, so every start recompiled every such kernel (the attention kernel alone cost ~3 s of each
warm start; measured with NUMBA_DEBUG_CACHE=1: "data saved" on every run). Here a kernel is the template's source
with its names filled in, compiled as if written at the top level of the calling module (same file name, so the
cache's source stamp is that file's, and a qualified name of its own): it has no closure, and what it calls are
module globals.
"""


def define(module_globals, source, **names):
    """Compile `source` (a `def NAME(...)` decorated with @njit(cache=True...)), each {key} in it replaced by
    names[key], in the namespace of the module whose globals() is module_globals; returns the function NAME."""
    for key, value in names.items():
        source = source.replace("{" + key + "}", str(value))
    local = {}
    exec(compile(source, module_globals["__file__"], "exec"), module_globals, local)  # noqa: S102
    (fn,) = local.values()
    return fn
