"""The Dagster code location: every asset module's `defs`, with resources wired from `params.yaml`.

Importing this module must stay cheap: no torch, transformers or diffusers at import time.
"""
import dagster as dg

from music_dagster.assets import data, evaluation, experiment, schedules, training, zoo
from music_dagster.console import quiet_third_party
from music_dagster.resources import ProjectConfig, build_resources

quiet_third_party()  # the code location is an entry point: `make ui`'s step processes import it

defs = dg.Definitions.merge(
    zoo.defs,
    data.defs,
    training.defs,
    evaluation.defs,
    experiment.defs,
    schedules.defs,
    dg.Definitions(resources=build_resources(ProjectConfig.from_environment())),
)
