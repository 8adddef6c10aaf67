"""From what a user has at hand to a selection: a selection URI, a curated URI, a Prefect flow-run id, an MLflow
run id, or a config's name (its latest finished curation). `sftcurate export` and `sftcurate ls` use it.

Runs are found in MLflow, the record of every curation: the `curate` flow tags its run with the selection and
curated URIs (`SELECTION_TAG`, `CURATED_TAG`) and the flow run's id; runs older than those tags are read from
their `summary.json` artifact.
"""
from __future__ import annotations

import difflib
import json
import re
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from sftcurate.data_contracts.errors import UserError
from sftcurate.data_contracts.manifests import CuratedMeta
from sftcurate.infra import tracking
from sftcurate.infra.settings import load_settings
from sftcurate.infra.stages import read_meta
from sftcurate.infra.store import is_committed, read_manifest

SELECTION_TAG, CURATED_TAG = "sftcurate.selection_uri", "sftcurate.curated_uri"
FLOW_RUN_TAG = "prefect.flow_run_id"
CURATE_RUNS = "tags.`prefect.flow` = 'curate'"
MLFLOW_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
FLOW_RUN_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
ARTIFACT_FILES = ("selection.parquet", "records.jsonl", "messages.jsonl", "curated.parquet", "_MANIFEST.json")


class SelectionNotFound(UserError):
    """Nothing a selection can be found by matches what the user gave."""


@dataclass(frozen=True)
class Found:
    selection_uri: str
    how: str  # what the reference was, in words: "selection URI", "curated URI", "MLflow run ...", ...


def locate_selection(ref: str) -> Found:
    """The selection `ref` names. A path or URI is read as an artifact (a file inside one counts as its folder);
    anything else as a run id or a config name, looked up in MLflow."""
    ref = ref.strip()
    if not ref:
        raise SelectionNotFound("export: give a selection URI, a curated URI, a run id or a config name")
    if _looks_like_location(ref) or (Path(ref).exists() and is_committed(ref)):
        return _from_artifact(ref)
    if MLFLOW_RUN_ID.match(ref):
        run = _run_by_id(ref)
        if run is not None:
            return Found(_selection_of(run), f"MLflow run {ref}")
    if FLOW_RUN_ID.match(ref.lower()):
        runs = _curate_runs(f"{CURATE_RUNS} and tags.`{FLOW_RUN_TAG}` = '{ref.lower()}'", 1)
        if runs:
            return Found(_selection_of(runs[0]), f"flow run {ref} (MLflow run {runs[0].info.run_id})")
        raise SelectionNotFound(f"{ref}: no curation ran as this Prefect flow run in {_tracking_where()}; "
                                "`sftcurate ls` lists the recent ones")
    runs = _curate_runs(f"{CURATE_RUNS} and attributes.run_name = '{_quoted(ref)}' "
                        "and attributes.status = 'FINISHED'", 1)
    if runs:
        return Found(_selection_of(runs[0]), f"name {ref}: its latest curation (MLflow run {runs[0].info.run_id})")
    names = {run.info.run_name for run in _curate_runs(CURATE_RUNS, 200)}
    close = difflib.get_close_matches(ref, sorted(names), n=3)
    hint = f"did you mean {' or '.join(repr(n) for n in close)}? " if close else ""
    raise SelectionNotFound(
        f"{ref}: not a committed artifact, nor a run id, nor the name of a finished curation in {_tracking_where()}; "
        f"{hint}pass the selection_uri a run printed, or see `sftcurate ls`")


def _looks_like_location(ref: str) -> bool:
    return "://" in ref or "/" in ref or "\\" in ref


def _from_artifact(ref: str) -> Found:
    uri = ref.rstrip("/")
    if not is_committed(uri) and uri.rsplit("/", 1)[-1] in ARTIFACT_FILES:
        uri = uri.rsplit("/", 1)[0]  # a file inside the artifact: its folder
    if not is_committed(uri):
        raise SelectionNotFound(f"{ref}: no committed selection or curated artifact there; pass the selection_uri "
                                "or curated_uri a run printed, a run id, or a config name (`sftcurate ls`)")
    kind = read_manifest(uri).get("kind")
    if kind == "selection":
        return Found(uri, "selection URI")
    if kind == "curated":
        return Found(read_meta(uri, CuratedMeta).selection_uri, "curated URI")
    raise SelectionNotFound(f"{ref}: a '{kind}' artifact, not a selection; pass the selection_uri or curated_uri "
                            "a run printed")


def _tracking_where() -> str:
    return load_settings().tracking_uri


def _quoted(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")


def _run_by_id(run_id: str):
    from mlflow.exceptions import MlflowException  # deferred on purpose: MLflow takes seconds to import

    try:
        return tracking.client().get_run(run_id)
    except MlflowException:
        return None


def _curate_runs(filter_string: str, limit: int) -> list:
    """Runs of the sftcurate experiment, newest first (none when nothing was ever tracked here: looking creates
    no experiment)."""
    experiment = tracking.client().get_experiment_by_name(tracking.EXPERIMENT)
    if experiment is None:
        return []
    return list(tracking.client().search_runs([experiment.experiment_id], filter_string=filter_string,
                                              order_by=["attributes.start_time DESC"], max_results=limit))


def _selection_of(run) -> str:
    uri = run.data.tags.get(SELECTION_TAG) or _summary(run).get("selection_uri") or _selection_dataset(run)
    if not uri:
        raise SelectionNotFound(f"MLflow run {run.info.run_id} ('{run.info.run_name}'): no selection recorded; it is "
                                "not a finished curation (`sftcurate ls` lists those)")
    return uri


def _selection_dataset(run) -> str | None:
    """The selection in the run's Datasets column: a `compare` cell's run has it (and no summary of its own)."""
    for item in getattr(run.inputs, "dataset_inputs", None) or []:
        if item.dataset.name == "selection":
            return json.loads(item.dataset.source).get("uri")
    return None


def _summary(run) -> dict:
    """The `summary.json` the curate flow logs (runs from before the URI tags have only it)."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = tracking.client().download_artifacts(run.info.run_id, "summary.json", tmp)
            return json.loads(Path(path).read_text())
    except Exception:  # no such artifact (a failed or foreign run): nothing recorded
        return {}


def recent_curations(limit: int = 20, name: str | None = None) -> list[dict]:
    """The newest curations first: name, method, budgets, sizes, status and the URIs to export them by."""
    query = CURATE_RUNS + (f" and attributes.run_name = '{_quoted(name)}'" if name else "")
    rows = []
    for run in _curate_runs(query, limit):
        params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
        summary = {} if tags.get(SELECTION_TAG) or run.info.status != "FINISHED" else _summary(run)

        def number(key: str):
            value = metrics.get(key, summary.get(key))
            return None if value is None else int(value)

        rows.append({
            "name": run.info.run_name, "method": params.get("selection.method") or tags.get("method"),
            **_budgets(params),
            "selected": number("selected"), "tokens_kept": number("tokens_kept"), "pool_size": number("pool_size"),
            "status": run.info.status,
            "started": datetime.fromtimestamp(run.info.start_time / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "selection_uri": tags.get(SELECTION_TAG) or summary.get("selection_uri"),
            "curated_uri": tags.get(CURATED_TAG) or summary.get("curated_uri"),
            "mlflow_run_id": run.info.run_id, "flow_run_id": tags.get(FLOW_RUN_TAG) or None,
        })
    return rows


def _budgets(params: dict) -> dict:
    """The limits a run honoured (`SelectionConfig.examples_budget`: the default example count when neither
    budget was set)."""
    budget, tokens = _param_int(params.get("selection.budget")), _param_int(params.get("selection.token_budget"))
    if budget is None and tokens is None and "selection.budget" in params:
        # deferred on purpose: the config module loads every selector (torch among them), seconds `ls` need not wait
        from sftcurate.core.config import DEFAULT_EXAMPLE_BUDGET

        budget = DEFAULT_EXAMPLE_BUDGET
    return {"budget": budget, "token_budget": tokens}


def _param_int(value: str | None) -> int | None:
    return int(value) if value not in (None, "", "None") and value.lstrip("-").isdigit() else None
