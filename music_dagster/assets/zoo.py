"""The tiny model zoo as an asset: `models/tiny/<role>/` for every role (what the tiny profile's resources load)."""

import dagster as dg
from pydantic import Field

from music_dagster.resources.project import ProjectConfig
from music_dagster.tracking.dvc import record_output
from music_dagster.zoo import tiny as zoo


class ZooConfig(dg.Config):
    seed: int | None = Field(default=None, description="random-weights seed (default: params.yaml `seed`)")


def _metadata(manifest: dict, roles) -> dict:
    rows = ["| role | class | parameters | files sha256 |", "| --- | --- | ---: | --- |"]
    for role in roles:
        e = manifest["roles"][role]
        rows.append(f"| {role} | {e['class']} | {e['parameters']:,} | `{e['hash'][:16]}` |")
    meta = {
        "roles": dg.MetadataValue.md("\n".join(rows)),
        "total_parameters": dg.MetadataValue.int(sum(manifest["roles"][r]["parameters"] for r in roles)),
    }
    for role in roles:
        e = manifest["roles"][role]
        meta[f"{role}/class"] = e["class"]
        meta[f"{role}/parameters"] = dg.MetadataValue.int(e["parameters"])
        meta[f"{role}/files_hash"] = e["hash"]
    return meta


@dg.asset(group_name="models", kinds={"pytorch"}, description=zoo.__doc__.splitlines()[0])
def tiny_model_zoo(context: dg.AssetExecutionContext, config: ZooConfig,
                   project: ProjectConfig) -> dg.MaterializeResult:
    from music_dagster.config import ROLES

    cfg = project.get()
    seed = cfg.seed if config.seed is None else config.seed
    folders = zoo.build_zoo(seed=seed, root=zoo.root_of(cfg), progress=lambda role, e: context.log.info(
        f"{role}: {e['class']}, {e['parameters']:,} parameters"))
    root = next(iter(folders.values())).parent
    manifest = zoo.read_manifest(root)
    zoo_hash = zoo.files_digest({role: manifest["roles"][role]["hash"] for role in ROLES})
    recorded = record_output(root)  # the `zoo` stage in dvc.lock, so `dvc repro` agrees with this run
    return dg.MaterializeResult(
        metadata={"path": dg.MetadataValue.path(str(root)), "seed": seed, **_metadata(manifest, ROLES),
                  **recorded.metadata()},
        data_version=dg.DataVersion(zoo_hash),
    )


@dg.asset_check(asset=tiny_model_zoo, description="every role's files still match the hashes in zoo.json")
def zoo_files_match_manifest(project: ProjectConfig) -> dg.AssetCheckResult:
    from music_dagster.config import ROLES

    root = zoo.root_of(project.get())
    manifest = zoo.read_manifest(root)
    changed = [r for r in ROLES if r not in manifest["roles"] or
               zoo.file_hashes(root / r) != manifest["roles"][r]["files"]]
    return dg.AssetCheckResult(passed=not changed, metadata={"changed_or_missing": ", ".join(changed) or "none"})


zoo_job = dg.define_asset_job("zoo_job", selection=dg.AssetSelection.assets(tiny_model_zoo))

defs = dg.Definitions(assets=[tiny_model_zoo], asset_checks=[zoo_files_match_manifest], jobs=[zoo_job])
