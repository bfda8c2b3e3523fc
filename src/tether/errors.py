"""Errors a user can fix. The CLI prints them as one line and exits with code 2, no traceback."""


class TetherError(Exception):
    """Bad input: a config key, a data row, a model name. The message says what and where."""


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses or gradients in a row; the run stops before the weights rot."""
