"""Evaluation: the scores (`metrics`), the benchmarks (`dreambench`, `msic`, with what both share in `common`) and
what a run reports (`report`: summaries, tables, plots, output files, the MLflow run). Library code: nothing here
imports Dagster or the assets."""
