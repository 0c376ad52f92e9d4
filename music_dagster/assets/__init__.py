"""Thin Dagster assets over the library; each module exposes `defs`."""
