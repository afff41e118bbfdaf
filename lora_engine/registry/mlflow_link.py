"""--mlflow-register: a registry version mirrored into MLflow's model registry, its stages as MLflow aliases.

Our registry stays the source of truth: this runs only after a publish, promotion or rollback has been
committed there, and a failure here undoes nothing of it (the command says so and exits 2; rerunning the same
command registers again, as publishing the same files returns the version that already holds them).

    model version   source = the version's folder in our registry; description = its note; tags
                    lora_engine.version (chat@v1), lora_engine.content_sha256, lora_engine.run_dir,
                    lora_engine.data_sha256 (the sha256 of the version's data_manifest.json: the data lineage);
                    run_id = the MLflow run that trained it, when --report-to mlflow recorded one for that folder
    alias           production / staging, moved to the MLflow version of ours that holds the stage (MLflow 3
                    deprecates stages; aliases are what replaces them)

The tracking URI: --mlflow-tracking-uri, else $MLFLOW_TRACKING_URI, else MLflow's default; a local
sqlite:///path.db needs no server (with sqlalchemy and alembic beside mlflow-skinny). MLflow is imported only here,
only when asked.
"""

from __future__ import annotations

import contextlib
import importlib

from lora_engine.cli import CliError

VERSION_TAG = "lora_engine.version"
RUN_DIR_TAG = "lora_engine.run_dir"  # set on the MLflow run by train's --report-to mlflow (train/trackers.py)


def client(tracking_uri: str | None):
    """An MlflowClient on the URI (None: $MLFLOW_TRACKING_URI or MLflow's default); one line when MLflow is
    missing. Called before our registry is written, so a missing package stops the command before it acts."""
    try:
        tracking = importlib.import_module("mlflow.tracking")
    except ImportError as e:
        raise CliError(f"--mlflow-register: the mlflow package is not installed ({e}); pip install mlflow-skinny "
                       "sqlalchemy alembic (sqlalchemy and alembic for a sqlite:/// tracking URI), or leave "
                       "--mlflow-register out") from e
    try:
        return tracking.MlflowClient(tracking_uri)
    except errors() as e:  # an unknown scheme is refused here, before our registry is touched
        raise CliError(f"--mlflow-tracking-uri {tracking_uri or '(from $MLFLOW_TRACKING_URI)'}: MLflow cannot use it "
                       f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}); nothing "
                       "was changed; give a sqlite:///path.db, file: or http(s):// URI") from e


def errors() -> tuple[type[BaseException], ...]:
    """What MLflow raises for a refused or unreachable store: its own MlflowException, OSError from a local
    store's folders, and sqlalchemy's errors from a sqlite:/// store that cannot be opened."""
    out: list[type[BaseException]] = [importlib.import_module("mlflow.exceptions").MlflowException, OSError]
    with contextlib.suppress(ImportError):  # no sqlalchemy: no sqlite store, so none of its errors
        out.append(importlib.import_module("sqlalchemy.exc").SQLAlchemyError)
    return tuple(out)


def failed(ref: str, root, uri: str | None, e: BaseException) -> CliError:
    """The one line for an MLflow failure after our registry has done its part."""
    return CliError(f"{ref} is in the registry {root} (the source of truth, unchanged by this failure), but "
                    f"MLflow ({uri or 'default tracking URI'}) refused it: {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}; fix the tracking URI and rerun the same command "
                    "to register it")


def _trained_by(cl, run_dir: str | None) -> str | None:
    """The MLflow run that --report-to mlflow opened for run_dir, if any (found by its lora_engine.run_dir tag)."""
    if not run_dir or "'" in run_dir:  # the filter's quoting has no escape for a quote
        return None
    ids = [x.experiment_id for x in cl.search_experiments()]
    runs = cl.search_runs(ids, filter_string=f"tags.`{RUN_DIR_TAG}` = '{run_dir}'", max_results=1) if ids else []
    return runs[0].info.run_id if runs else None


def _find(cl, model: str, ref: str):
    return next((mv for mv in cl.search_model_versions(f"name = '{model}'") if mv.tags.get(VERSION_TAG) == ref),
                None)


def register(cl, model: str, shown: dict) -> tuple[str, bool]:
    """Registry.show's dict of one version -> (its MLflow version number, created now?). Idempotent: a version
    already registered with the same lora_engine.version tag is returned as it is."""
    mlflow_exceptions = importlib.import_module("mlflow.exceptions")
    try:
        cl.get_registered_model(model)
    except mlflow_exceptions.MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        cl.create_registered_model(model, description="published by python -m lora_engine.registry")
    found = _find(cl, model, shown["ref"])
    if found is not None:
        return str(found.version), False
    lineage = shown["lineage"]
    tags = {VERSION_TAG: shown["ref"], "lora_engine.content_sha256": shown["content_sha256"],
            "lora_engine.run_dir": lineage.get("run_dir") or "",
            "lora_engine.data_sha256": shown["sha256"].get("data_manifest.json", "")}
    mv = cl.create_model_version(model, shown["path"], run_id=_trained_by(cl, lineage.get("run_dir")), tags=tags,
                                 description=shown["note"] or "")
    return str(mv.version), True


def set_alias(cl, model: str, stage: str, shown: dict) -> str:
    """Point MLflow's alias `stage` at the MLflow version of `shown` (registered first when it is not yet)."""
    version, _ = register(cl, model, shown)
    cl.set_registered_model_alias(model, stage, version)
    return version
