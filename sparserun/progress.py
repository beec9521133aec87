"""Progress on stderr, one line rewritten in place: every long command reports through `stderr_progress`."""
import sys


def stderr_progress(done, total, text):
    """A bar for step done of total with text; total 0: a one-off message on a line of its own."""
    if not total:
        sys.stderr.write(f"\r{text}".ljust(78) + "\n")
    else:
        width = 20
        filled = int(width * done / total)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}".ljust(78) + ("\n" if done >= total else ""))
    sys.stderr.flush()
