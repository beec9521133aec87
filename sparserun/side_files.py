"""The project's own files beside a model: profile, placement, predictors, teal thresholds. One mechanism for all of them.

Each is a GGUF of its own architecture ("sparserun-<kind>", no executable content) holding float32 tensors and
keys "sparserun.<kind>.*", bound to its model by the model's tensor fingerprint (GGUFFile.fingerprint), and
found by default at <model file>.<kind>.gguf. A file that is missing, damaged, of another kind or made for
another model is refused in one line that names it.
"""
import os

from .errors import SparserunError
from .gguf_file import read_side_file, write_side_file


class SideFile:
    def __init__(self, kind, noun):
        self.kind, self.noun = kind, noun  # "predictors", "predictor file"
        self.arch = f"sparserun-{kind}"
        self.prefix = f"sparserun.{kind}."

    def default_path(self, model_path):
        """model.gguf -> model.gguf.<kind>.gguf (where the command that writes it puts it, and loads look)."""
        return f"{model_path}.{self.kind}.gguf"

    def given_or_default(self, path, model_path):
        """path when given, else the default file when it exists, else None (loads that use a file if there is one)."""
        if path is not None:
            return path
        default = self.default_path(model_path)
        return default if os.path.exists(default) else None

    def write(self, path, fingerprint, values, tensors):
        """values: the file's own keys without the prefix; tensors: name -> float32 array."""
        keys = {self.prefix + "model_fingerprint": fingerprint}
        keys.update({self.prefix + k: v for k, v in values.items()})
        write_side_file(path, self.arch, keys, tensors)

    def read(self, path, build, model=None):
        """build(values, tensors) -> the object; any exception it raises means a damaged file. With `model`, a file
        made for another model is refused. Returns (object, fingerprint)."""
        if not os.path.exists(path):
            raise SparserunError(f"{path}: no such {self.noun}")
        try:
            meta, tensors = read_side_file(path, self.arch)
            values = {k[len(self.prefix):]: v for k, v in meta.items() if k.startswith(self.prefix)}
            fingerprint = str(values.pop("model_fingerprint"))
            obj = build(values, tensors)
        except SparserunError:
            raise
        except Exception as e:
            raise SparserunError(f"{path}: not a valid sparserun {self.noun} ({type(e).__name__}: {str(e)[:100]})") \
                from None
        if model is not None and fingerprint != model.gguf.fingerprint():
            raise SparserunError(f"{path}: this {self.noun} was made for another model (fingerprint "
                                 f"{fingerprint[:12]}..., {model.path} is {model.gguf.fingerprint()[:12]}...)")
        return obj, fingerprint


PROFILE = SideFile("profile", "profile file")
PLACEMENT = SideFile("placement", "placement file")
PREDICTORS = SideFile("predictors", "predictor file")
TEAL = SideFile("teal", "teal thresholds file")
