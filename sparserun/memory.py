"""Memory the kernels stream or read at random: anonymous buffers in 2 MiB transparent huge pages.

A neuron pack is read a few KB here and there (one unit per kept neuron). With 4 KiB pages nearly every unit
is a TLB miss, and the page walks cost a fifth of the bandwidth: on 2 cores, reading random 3.4 KB units
of 460 MB ran at 22 GB/s in 4 KiB pages and 28.5 GB/s in huge pages, the speed of a sequential read, at
every kept fraction from 0.1 to 1. A file mapping (the page cache) cannot get huge pages, so the packs are
read into these buffers instead of being memory-mapped.
"""
import mmap

import numpy as np

HUGE = 2 << 20  # bytes in a transparent huge page (x86-64 and arm64 with 4 KiB base pages)


def huge_page_buffer(nbytes):
    """A zero-filled, writable uint8 array of nbytes starting on a 2 MiB boundary, in a private anonymous mapping
    advised for transparent huge pages where the OS has them (elsewhere plain pages: the same array). Only the whole
    huge pages inside the array are advised: a huge page is faulted in whole, so an advised tail past the array's end
    would be resident too (up to 2 MiB a buffer: 148 MB over a TinyLlama's 88 column packs). The mapping lives as
    long as the array (numpy keeps the mmap object as the array's base)."""
    size = nbytes + HUGE  # room to start at the next 2 MiB boundary; the untouched slack never becomes resident
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    # Python's mmap(-1) is a shared mapping unless told otherwise, and shared memory gets no huge pages
    mm = mmap.mmap(-1, size, flags=flags) if flags else mmap.mmap(-1, size)
    buf = np.frombuffer(mm, np.uint8)
    start = -buf.ctypes.data % HUGE
    whole = nbytes // HUGE * HUGE
    if hasattr(mmap, "MADV_HUGEPAGE") and whole:
        try:
            mm.madvise(mmap.MADV_HUGEPAGE, start, whole)
        except OSError:  # THP compiled out or disabled: plain pages
            pass
    return buf[start:start + nbytes]


def _mapping(view):
    """(the mmap object under a numpy view, the view's byte offset in it), or (None, 0)."""
    root = view
    while isinstance(root.base, np.ndarray):
        root = root.base
    mm = getattr(root.base, "obj", root.base)  # np.frombuffer(mmap) keeps a memoryview of it
    if not isinstance(mm, mmap.mmap):
        return None, 0
    return mm, view.__array_interface__["data"][0] - root.__array_interface__["data"][0]


def discard(view, inner=True):
    """Give the pages under `view` (bytes of a mapping made here or a file's) back to the OS: MADV_DONTNEED. A private
    anonymous page then reads as zeros, so only the pages wholly inside the view go (inner); a file's pages are read
    again from the file if touched, so those the view shares with a neighbour may go too (inner=False). Returns
    whether anything was discarded (False where the view is not in a mapping or the OS lacks madvise)."""
    mm, start = _mapping(view)
    if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
        return False
    end = start + view.nbytes
    page = mmap.PAGESIZE
    start = -(-start // page) * page if inner else start - start % page
    end = end - end % page if inner else end
    if end <= start:
        return False
    try:
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)
    except (OSError, ValueError):
        return False
    return True


class Arena:
    """Buffers carved back to back (64-byte aligned) from one huge-page buffer of a planned size: the loader's
    weight matrices, so every one lies in huge pages whatever its size. numpy advises huge pages only for
    allocations of 4 MiB and up, and only the whole 2 MiB pages inside each (a TinyLlama's 2.4-3 MB attention
    matrices got none), and a file mapping gets none at all; 4 KiB pages cost a streaming matvec its hardware
    prefetch at every page boundary and a TLB miss per page. A/B in one process, TinyLlama decode: Q4_0's q/k/v
    and output projections of 22 layers 4.17 -> 3.79 ms a token; Q8_0 dense decode 39.9 -> 44.3 t/s. A request
    beyond the plan gets a buffer of its own."""

    def __init__(self, nbytes):
        self.buf = huge_page_buffer(nbytes) if nbytes > 0 else None
        self.at = 0

    def take(self, nbytes):
        at = -(-self.at // 64) * 64
        if self.buf is None or at + nbytes > self.buf.nbytes:
            return huge_page_buffer(nbytes)
        self.at = at + nbytes
        return self.buf[at:at + nbytes]


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def keep_freed_buffers(trim=1 << 30, mmap_threshold=32 << 20):
    """Keep what a prompt batch frees for the next batch and layer to reuse (glibc only; elsewhere nothing).
    A batch's temporaries are tens of MB (a 512-token gate|up output of TinyLlama: 23 MB): by default glibc
    maps each anew and unmaps it when freed, so every layer faulted them in again (zeroed by the OS), about 5% of
    a 512-token prompt's time. Allocations up to mmap_threshold (glibc's most, 32 MiB) come from the heap, and
    the heap gives back free memory above trim only."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_TRIM_THRESHOLD, trim))
