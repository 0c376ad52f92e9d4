"""The multi-node path, offline: the Kubernetes job dagster-k8s would submit for a model-heavy step asks for one GPU
and a CPU step's for none, with the image and volumes of deploy/k8s/values.yaml and Dagster's step command."""
import pytest
import yaml
from dagster._core.definitions.reconstruct import ReconstructableRepository
from dagster._grpc.types import ExecuteStepArgs
from dagster_k8s import DagsterK8sJobConfig, construct_dagster_k8s_job
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import get_user_defined_k8s_config

from music_dagster.config import PROJECT_ROOT

VALUES = yaml.safe_load((PROJECT_ROOT / "deploy" / "k8s" / "values.yaml").read_text())
DEPLOYMENT = VALUES["dagster-user-deployments"]["deployments"][0]
IMAGE = f"{DEPLOYMENT['image']['repository']}:{DEPLOYMENT['image']['tag']}"


def step_job(step: str):
    """The V1Job for `step` of the Kubernetes code location's data_job, built as the k8s_job_executor builds it:
    the run launcher's container context from the Helm values, merged with the step's `dagster-k8s/config` tag."""
    repo = ReconstructableRepository.for_module("music_dagster.k8s", "defs", container_image=IMAGE)
    job_def = repo.get_definition().get_job("data_job")
    assert job_def.executor_def.name == "k8s"
    launcher = VALUES["runLauncher"]["config"]["k8sRunLauncher"]
    context = K8sContainerContext(env_vars=launcher["envVars"], volumes=launcher["volumes"],
                                  volume_mounts=launcher["volumeMounts"]).merge(
        K8sContainerContext(run_k8s_config=get_user_defined_k8s_config(job_def.graph.node_named(step).tags)))
    args = ExecuteStepArgs(job_origin=repo.get_reconstructable_job("data_job").get_python_origin(), run_id="r1",
                           step_keys_to_execute=[step], instance_ref=None)
    job_config = DagsterK8sJobConfig(job_image=repo.container_image, dagster_home="/opt/dagster/dagster_home")
    return construct_dagster_k8s_job(job_config, args.get_command_args(skip_serialized_namedtuple=True),
                                     f"dagster-step-{step.replace('_', '-')}",
                                     user_defined_k8s_config=context.run_k8s_config)


@pytest.mark.parametrize("step, gpus", [("target_images", "1"), ("grid_layouts", None)])
def test_a_model_heavy_step_pod_asks_for_one_gpu_and_a_cpu_step_pod_for_none(step, gpus):
    job = step_job(step)
    (container,) = job.spec.template.spec.containers
    assert container.image == IMAGE == "registry.example.com/music-dagster:0.1.0"
    assert container.args[-3:] == ["dagster", "api", "execute_step"]
    limits = (container.resources.limits or {}) if container.resources else {}
    assert limits.get("nvidia.com/gpu") == gpus
    assert {m.mount_path for m in container.volume_mounts} >= {"/opt/music/models", "/opt/music/datasets"}
    assert {"name": "MUSIC_PROFILE", "value": "full"} in [{"name": e.name, "value": e.value} for e in container.env]


def test_the_code_location_serves_the_k8s_definitions():
    assert DEPLOYMENT["dagsterApiGrpcArgs"] == ["-m", "music_dagster.k8s"]
    assert "music_dagster" in (PROJECT_ROOT / "deploy" / "k8s" / "Dockerfile").read_text()
