"""The code location on Kubernetes (deploy/k8s/): the project's definitions, with `data_job`'s steps each in its own
pod through dagster-k8s's `k8s_job_executor`.

A model-heavy step's pod asks for one GPU (its `dagster-k8s/config` tag, `assets.data.GPU_STEP_TAGS`), a CPU step's
for none. A step covers a whole range of shards, so a pod imports torch and loads its models once for all of them.
The pods' image, DAGSTER_HOME and volumes come from the Helm values' run launcher (`deploy/k8s/values.yaml`).
"""
import dagster as dg
from dagster_k8s import k8s_job_executor

from music_dagster.assets.data import build_data_job
from music_dagster.definitions import defs as local

data_job = build_data_job(k8s_job_executor)

defs = dg.Definitions(
    assets=local.assets, asset_checks=local.asset_checks, schedules=local.schedules, sensors=local.sensors,
    jobs=[job for job in local.jobs if job.name != data_job.name] + [data_job], resources=local.resources,
)
