"""MUSIC multi-subject in-context image generation, as a Dagster project."""
