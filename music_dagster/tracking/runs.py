"""MLflow helpers that know nothing of Dagster: one run per training, evaluation nested under it, `music runs`.

mlflow is imported inside functions so that loading the code location stays fast. The store is a SQLite file and
artifacts a folder, both in the project by default (`paths.mlflow_tracking_uri`, `paths.mlflow_artifacts`).
`check_store` probes both before a run opens, so a damaged or read-only store is one line naming it and the fix,
before any training; a store failing after a checkpoint was published says where the checkpoint is kept.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from music_dagster.config import PROJECT_ROOT, Config
from music_dagster.errors import UserError
from music_dagster.evaluation.metrics import METRICS

EXPERIMENT = "music"
RUN_REF = "mlflow_run.json"  # written into a checkpoint folder: which run trained it
DEFAULT_UI_URL = "http://127.0.0.1:5000"
# Tags every training run carries (the DVC ones once `dvc.record_output` has committed the checkpoint).
TAG_DAGSTER_RUN = "dagster.run_id"
TAG_PARTITIONS = "dagster.partitions"
TAG_GIT_COMMIT = "git.commit"
TAG_DATA_VERSION = "data.version"
TAG_DVC_HASH = "dvc.md5"
TAG_KIND = "music.kind"  # "training" or "evaluation"
TAG_MODEL = "music.model"  # what a training run trains: "lora" or "detokenizer"


class TrackingError(UserError):
    """An MLflow run or store that cannot be used as asked (missing run, bad URI, damaged or read-only store)."""


@dataclass(frozen=True)
class Store:
    """Where runs and artifacts live."""

    tracking_uri: str
    artifact_root: str  # a URI (file:///...) under which each experiment gets a folder
    experiment: str = EXPERIMENT
    ui_url: str = DEFAULT_UI_URL
    system_metrics_interval_s: float = 1.0


def store_from_config(config: Config) -> Store:
    """The project's store: a relative SQLite path or artifact folder is relative to the project root, not the cwd."""
    uri = config.paths.mlflow_tracking_uri
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{PROJECT_ROOT / uri.removeprefix('sqlite:///')}"
    artifacts = config.paths.mlflow_artifacts
    if "://" not in artifacts:
        artifacts = config.paths.resolve("mlflow_artifacts").as_uri()
    return Store(tracking_uri=uri, artifact_root=artifacts)


def _sqlite_path(store: Store) -> Path | None:
    return Path(store.tracking_uri.removeprefix("sqlite:///")) if store.tracking_uri.startswith("sqlite:///") else None


def check_store(store: Store, write: bool = True) -> None:
    """One line naming the path and the fix when the SQLite store is damaged, or, with `write`, when it or the
    experiment's artifact folder cannot be written. Nothing is changed (the write probe is rolled back). A store
    that is not a SQLite file (a tracking server) reports its own errors."""
    import sqlite3

    from music_dagster.storage import check_writable

    db = _sqlite_path(store)
    if db is None:
        return
    setting = "paths.mlflow_tracking_uri"
    if write:
        check_writable(db.parent, setting, target=db)  # SQLite writes its journal beside the store
    location = None
    if db.exists():
        try:
            con = sqlite3.connect(f"{db.resolve().as_uri()}?mode={'rw' if write else 'ro'}", uri=True, timeout=30,
                                  isolation_level=None)
            try:
                check = con.execute("PRAGMA quick_check").fetchone()[0]
                if check != "ok":
                    raise sqlite3.DatabaseError(check)
                if con.execute("SELECT 1 FROM sqlite_master WHERE name = 'experiments'").fetchone():
                    row = con.execute("SELECT artifact_location FROM experiments WHERE name = ?",
                                      (store.experiment,)).fetchone()
                    location = row and row[0]
                if write:  # SQLite opens a write-protected file read-only without a word: try a write
                    con.execute("BEGIN IMMEDIATE")
                    con.execute("CREATE TABLE music_write_probe (x)")
                    con.execute("ROLLBACK")
            finally:
                con.close()
        except sqlite3.Error as e:
            name = getattr(e, "sqlite_errorname", "")
            if name == "SQLITE_READONLY":
                raise TrackingError(f"{db}: the MLflow store is read-only; make it writable (chmod u+w {db}), or "
                                    f"set {setting} in params.yaml to a writable store") from None
            if name == "SQLITE_BUSY":
                raise TrackingError(f"{db}: the MLflow store is locked by another process ({e}); let it finish "
                                    f"and run again") from None
            if name == "SQLITE_CANTOPEN":
                raise TrackingError(f"{db}: the MLflow store cannot be opened ({e}); make it and its folder "
                                    f"readable and writable") from None
            raise TrackingError(f"{db}: the MLflow store is damaged ({e}); move it aside (mv {db} {db}.damaged) "
                                f"and run again to start a new store, or set {setting} in params.yaml") from None
    if write:
        artifacts = location or f"{store.artifact_root.rstrip('/')}/{store.experiment}"
        if artifacts.startswith("file://") or "://" not in artifacts:
            from urllib.parse import unquote, urlparse

            folder = Path(unquote(urlparse(artifacts).path)) if "://" in artifacts else Path(artifacts)
            check_writable(folder, "paths.mlflow_artifacts")


def client(store: Store, write: bool = True):
    """An `MlflowClient` on `store` after `check_store`, with its experiment created (the artifact folder is fixed
    at creation). `write=False` (reading runs): a read-only store will do, and no experiment is created."""
    check_store(store, write)
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    db = _sqlite_path(store)
    if write and db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    mlf = MlflowClient(store.tracking_uri)
    if write and mlf.get_experiment_by_name(store.experiment) is None:
        try:
            mlf.create_experiment(store.experiment,
                                  artifact_location=f"{store.artifact_root.rstrip('/')}/{store.experiment}")
        except MlflowException:  # another process created it meanwhile
            if mlf.get_experiment_by_name(store.experiment) is None:
                raise
    return mlf


def flatten(value, prefix: str = "") -> dict[str, str]:
    """A nested mapping as MLflow params: dotted keys, leaf values as strings (lists as JSON)."""
    out: dict[str, str] = {}
    if isinstance(value, Mapping):
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(value, (list, tuple)):
        out[prefix] = json.dumps(list(value), sort_keys=True, default=str)
    else:
        out[prefix] = "" if value is None else str(value)
    return out


def config_params(config: Config) -> dict[str, str]:
    """Every config value of the selected profile, flattened (`train.lr`, `models.music_llm.id`, ...)."""
    return flatten(config.model_dump(mode="json"))


def git_commit(root: Path = PROJECT_ROOT) -> str:
    """The checkout's commit, with `-dirty` when tracked files differ from it; `unknown` outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def data_version(manifests: Iterable[str | os.PathLike], root: Path | None = None, extra: Iterable[str] = ()) -> str:
    """A sha256 over the training shards' manifests (names relative to `root` and contents), order-free, and
    `extra` strings describing other sources (the procedural world's settings)."""
    digest = hashlib.sha256()
    for item in sorted(extra):
        digest.update(f"extra:{item}\0".encode())
    for path in sorted(Path(p) for p in manifests):
        name = path.relative_to(root) if root is not None else path.name
        digest.update(f"{name.as_posix() if root is not None else name}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def run_url(store: Store, experiment_id: str, run_id: str) -> str:
    """Where the run is shown by `mlflow ui --backend-store-uri <store>` on its default address."""
    return f"{store.ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


class ActiveRun:
    """A run being written through the client (not mlflow's fluent run stack, which Dagster steps would share)."""

    def __init__(self, store: Store, mlf, run):
        self.store = store
        self.client = mlf
        self.run_id: str = run.info.run_id
        self.experiment_id: str = run.info.experiment_id
        self.url = run_url(store, self.experiment_id, self.run_id)
        self.kept: tuple[Path, str] | None = None

    def keep(self, checkpoint: str | os.PathLike, again: str) -> None:
        """`checkpoint` is published: from now on a store failure says where it is kept and that the command
        `again` logs it again."""
        self.kept = (Path(checkpoint), again)

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        """Final figures (scores, totals): one value each, at step 0."""
        self.log_step(0, metrics)

    def set_tags(self, tags: Mapping[str, object]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_params(self, params: Mapping[str, object]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)) for k, v in params.items()]
        for i in range(0, len(items), 100):  # the store's batch limit for params
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_artifacts(self, folder: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def reference(self) -> dict:
        """What a checkpoint folder records about the run that made it."""
        return {"run_id": self.run_id, "experiment_id": self.experiment_id, "tracking_uri": self.store.tracking_uri,
                "url": self.url}


@contextlib.contextmanager
def start_run(store: Store, name: str, tags: Mapping[str, object] | None = None, parent_run_id: str | None = None,
              system_metrics: bool = False) -> Iterator[ActiveRun]:
    """A new run (nested under `parent_run_id` when given, even if that run has finished), ended on exit:
    FINISHED normally, FAILED when the body raises."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    mlf = client(store)
    tags = {k: str(v) for k, v in (tags or {}).items()}
    experiment_id = mlf.get_experiment_by_name(store.experiment).experiment_id
    if parent_run_id is not None:
        try:
            parent = mlf.get_run(parent_run_id)
        except MlflowException:
            raise TrackingError(f"MLflow run {parent_run_id!r} not found in {store.tracking_uri}") from None
        # mlflow's start_run(parent_run_id=) wants an active parent; this tag is what nests a run in the UI.
        tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        experiment_id = parent.info.experiment_id
    run = mlf.create_run(experiment_id, run_name=name, tags={MLFLOW_RUN_NAME: name, **tags})
    monitor = None
    if system_metrics:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run.info.run_id, sampling_interval=store.system_metrics_interval_s,
                                       tracking_uri=store.tracking_uri)
        monitor.start()
    active = ActiveRun(store, mlf, run)

    def end(status: str) -> None:
        if monitor is not None:
            monitor.finish()
        mlf.set_terminated(run.info.run_id, status=status)

    try:
        try:
            yield active
        except BaseException:
            with contextlib.suppress(Exception):  # the body's error is the one to report, not a second one
                end("FAILED")
            raise
        end("FINISHED")
    except Exception as e:
        if active.kept is None or not _store_failure(e):
            raise
        checkpoint, again = active.kept
        raise TrackingError(f"{checkpoint}: trained and kept, but logging it to MLflow failed "
                            f"({_first_line(e)}); fix the store, then `{again}` logs it again (training resumes "
                            f"at its last step: nothing is retrained)") from None


def _store_failure(error: BaseException) -> bool:
    """An error of the MLflow store or its artifact folder (not of the code logging to it)."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    return isinstance(error, (MlflowException, SQLAlchemyError, OSError, TrackingError))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


@contextlib.contextmanager
def start_training_run(store: Store, config: Config, name: str, tags: Mapping[str, object] | None = None
                       ) -> Iterator[ActiveRun]:
    """One training run: the whole config as params, the git commit, system metrics sampled while it runs."""
    commit = git_commit()
    base = {TAG_KIND: "training", TAG_GIT_COMMIT: commit, "mlflow.source.git.commit": commit.removesuffix("-dirty"),
            "profile": config.profile_name}
    with start_run(store, name, {**base, **(tags or {})}, system_metrics=True) as run:
        run.log_params(config_params(config))
        yield run


def start_nested_run(store: Store, parent_run_id: str, name: str, tags: Mapping[str, object] | None = None):
    """An evaluation run nested under the training run `parent_run_id` (a context manager yielding `ActiveRun`)."""
    return start_run(store, name, {TAG_KIND: "evaluation", **(tags or {})}, parent_run_id=parent_run_id)


def write_run_ref(folder: str | os.PathLike, run: ActiveRun) -> Path:
    """Record in a checkpoint folder which run trained it (atomic)."""
    path = Path(folder) / RUN_REF
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(run.reference(), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def read_run_ref(folder: str | os.PathLike) -> dict:
    """The training run a checkpoint folder names (see `write_run_ref`)."""
    path = Path(folder) / RUN_REF
    if not path.is_file():
        raise TrackingError(f"{path}: no MLflow run recorded for this checkpoint")
    return json.loads(path.read_text())


KEY_PARAMS = ("profile_name", "seed", "profile.train.source", "profile.train.max_steps", "profile.train.epochs",
              "profile.train.lr", "profile.train.lora_rank")
LOSSES = ("loss", "L1", "L2")


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def list_runs(store: Store, limit: int = 10) -> list[dict]:
    """The latest training runs (newest first): key params, final losses, evaluation scores of their nested runs,
    checkpoint hash."""
    if limit < 1:
        raise TrackingError(f"--limit must be at least 1 (got {limit})")
    mlf = client(store, write=False)
    experiment = mlf.get_experiment_by_name(store.experiment)
    if experiment is None:
        return []
    runs = mlf.search_runs([experiment.experiment_id], filter_string=f"tags.`{TAG_KIND}` = 'training'",
                           order_by=["attributes.start_time DESC"], max_results=limit)
    rows = []
    for run in runs:
        children = mlf.search_runs([experiment.experiment_id],
                                   filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        scores = {}
        for child in children:
            for key, value in sorted(child.data.metrics.items()):
                if key.rsplit("/", 1)[-1] in METRICS and "by_subject_count" not in key:  # overall scores only
                    scores[f"{child.info.run_name}/{key}"] = value
        rows.append({
            "run_id": run.info.run_id,
            "name": run.info.run_name,
            "status": run.info.status,
            "params": {k.removeprefix("profile.train."): run.data.params[k] for k in KEY_PARAMS if k in run.data.params},
            "losses": {k: run.data.metrics[k] for k in LOSSES if k in run.data.metrics},
            "scores": scores,
            "checkpoint": run.data.tags.get(TAG_DVC_HASH),
        })
    return rows


def format_runs(rows: list[dict]) -> str:
    """`list_runs` as a plain table, one run a line."""
    header = ["run", "name", "status", "params", *LOSSES, "scores", "checkpoint"]
    table = [header]
    for row in rows:
        table.append([
            row["run_id"][:8], row["name"] or "-", row["status"],
            " ".join(f"{k}={v}" for k, v in row["params"].items()) or "-",
            *(_fmt(row["losses"].get(k)) for k in LOSSES),
            " ".join(f"{k}={_fmt(v)}" for k, v in row["scores"].items()) or "-",
            (row["checkpoint"] or "-")[:12],
        ])
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table)


def print_runs(limit: int = 10, store: Store | None = None) -> None:
    """`music runs`: the latest training runs of the project's store."""
    if store is None:
        from music_dagster.config import default_config

        store = store_from_config(default_config())
    rows = list_runs(store, limit)
    if not rows:
        print(f"no training runs yet in {store.tracking_uri} (materialize lora_checkpoint)")
        return
    print(format_runs(rows))
