"""Activation predictors: per-layer low-rank MLPs (d -> r -> n_ff) trained offline with numpy on a
model's own activations (train.py), saved as fingerprint-bound GGUF files (format.py), and run by
`--sparsity predictor[:FILE]` (sparserun/predictor.py, numba kernels)."""
