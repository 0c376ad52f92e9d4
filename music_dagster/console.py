"""What the project's entry points (the `music` command, the Dagster code location) keep off a user's console.

Applied at the entry points only, never on import of a library module, so Python code that imports music_dagster
keeps every warning and log line its own settings allow.
"""
from __future__ import annotations

import os
import warnings

# Third-party deprecations a user can do nothing about: peft reads transformers' renamed
# `is_gradient_checkpointing` on every adapter load.
KNOWN_DEPRECATIONS = (r"`is_gradient_checkpointing` is deprecated",)


def quiet_third_party(verbose: bool = False) -> None:
    """Filter known third-party deprecation warnings and, unless `verbose`, MLflow's INFO lines (its store
    migrations, system-metrics monitor): MLflow reads MLFLOW_LOGGING_LEVEL when it is first imported."""
    for message in KNOWN_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if verbose else "WARNING")
