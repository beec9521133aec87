"""Activation predictors (training and file format): not implemented yet; see the project's issue on
profiling and predictors. The package exists so the installed layout is stable."""
