"""Prefect and MLflow point at each other: the MLflow run carries the flow run's id and UI address, the flow run
carries a link (or, with a SQLite tracking file, a note) to the MLflow run; flow runs are named after the config."""
from __future__ import annotations

from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.runtime import flow_run
from prefect.settings import PREFECT_UI_URL

from sftcurate.infra import tracking
from sftcurate.infra.settings import load_settings


def flow_run_name() -> str:
    """`<config name>-<method or 'compare'>`, so the Prefect UI lists runs by what they did, not random words."""
    params = flow_run.parameters or {}
    config = params.get("config") or {}
    get = config.get if isinstance(config, dict) else (lambda key, default=None: getattr(config, key, default))
    name = get("name", None) or flow_run.flow_name or "sftcurate"
    selection = get("selection", None)
    method = (selection.get("method") if isinstance(selection, dict) else getattr(selection, "method", None))
    return f"{name}-{method}" if method and method not in name else str(name)


def flow_run_url() -> str | None:
    ui = PREFECT_UI_URL.value()
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run.id}" if ui and flow_run.id else None


def link_runs(mlflow_run_id: str) -> None:
    """Tag the MLflow run with this flow run, and give this flow run an artifact that leads to the MLflow run."""
    if flow_run.id is None:  # called outside a flow run (a library caller): nothing to link
        return
    tracking.set_tags(mlflow_run_id, {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": flow_run.name,
                                      "prefect.flow_run_url": flow_run_url()})
    url = tracking.run_url(mlflow_run_id)
    if url:
        create_link_artifact(url, link_text=f"MLflow run {mlflow_run_id}", key="mlflow-run",
                             description="the MLflow run of this flow run")
    else:
        uri = load_settings().tracking_uri
        create_markdown_artifact(
            f"MLflow run `{mlflow_run_id}` in `{uri}`; open it with `sftcurate ui` (or `mlflow ui --backend-store-uri "
            f"{uri}`).",
            key="mlflow-run", description="the MLflow run of this flow run")
