"""User-facing errors: the CLI prints these as one line and exits with code 2 (never a traceback)."""


class SparserunError(Exception):
    """A problem with the user's input (file, flag, value), described in one line."""


class ModelFileError(SparserunError):
    """A model file that is missing, not GGUF, corrupted, truncated or of an unsupported kind."""

    def __init__(self, path, problem):
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = str(path), problem
