"""Lineage: MLflow runs and DVC records."""
