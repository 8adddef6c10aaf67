"""The `refresh` flow: re-run the curation when the source data changed, do nothing costly when it did not.

It runs `curate` as a subflow. Every stage of `curate` is cached on content (source fingerprint, artifact URIs,
code), so an unchanged source makes every stage a cache hit and a changed one recomputes what depends on it.
It then compares the new examples artifact with the one the previous refresh recorded and reports
what changed (source fingerprints before/after, example ids added and removed, selection changes) on the
terminal, in MLflow (a `refresh-<name>` run) and as a Prefect markdown artifact.

State, one small JSON per config name: `<store>/refresh-state/<slug>-<hash of the name>.json` (last
examples/selection URIs and fingerprints), in the artifact store so that every machine running the refresh (CI, a
worker) shares it. The slug makes the file readable; the hash keeps names apart that slug alike ("a/b" and "a-b",
every name in a script without Latin letters).
"""
from __future__ import annotations

import hashlib
import json
import re
import time

import sftcurate.infra  # noqa: F401  (environment defaults before Prefect reads its settings)
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from sftcurate.infra import tracking
from sftcurate.infra.hashing import fingerprint
from sftcurate.infra.store import ArtifactStore, exists, is_committed, join, read_bytes, write_bytes
from sftcurate.core.config import CurateConfig
from sftcurate.core.ingest import examples_meta, load_examples, source_fingerprint
from sftcurate.core.selection import load_selection
from sftcurate.flows.curate import curate
from sftcurate.tasks.links import flow_run_name, link_runs

STATE_DIR = "refresh-state"
SHOW_IDS = 20  # ids listed in the markdown artifact and on the terminal (all of them go to MLflow)


def slug(name: str) -> str:
    """A name usable as a file name and as a Prefect artifact key (lowercase letters, digits, dashes)."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "curation"


def state_uri(name: str, store_root: str | None = None) -> str:
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return join(ArtifactStore(store_root).root, STATE_DIR, f"{slug(name)}-{digest}.json")


def read_state(name: str, store_root: str | None = None) -> dict | None:
    """The previous refresh's state of this name; a state written under the old slug-only file name counts only
    when it records this very name (two names that slug alike shared that file)."""
    legacy = join(ArtifactStore(store_root).root, STATE_DIR, f"{slug(name)}.json")
    for uri in (state_uri(name, store_root), legacy):
        if not exists(uri):
            continue
        try:
            state = json.loads(read_bytes(uri))
        except (ValueError, OSError):  # a damaged record only means "no previous state"
            return None
        if uri != legacy or state.get("name") == name:
            return state
    return None


def write_state(name: str, state: dict, store_root: str | None = None) -> str:
    uri = state_uri(name, store_root)
    write_bytes(uri, json.dumps(state, indent=2, sort_keys=True).encode())
    return uri


def artifact_ids(uri: str | None, reader) -> list[str] | None:
    """Ids in a committed artifact, or None when there is no (longer a) readable artifact."""
    if not uri or not is_committed(uri):
        return None
    return reader(uri)


def _examples_ids(uri: str) -> list[str]:
    return load_examples(uri).column("id").to_pylist()


def _selection_ids(uri: str) -> list[str]:
    return load_selection(uri)[0].column("id").to_pylist()


def id_diff(before: list[str] | None, after: list[str]) -> tuple[list[str] | None, list[str] | None]:
    if before is None:
        return None, None
    b, a = set(before), set(after)
    return sorted(a - b), sorted(b - a)


def compare_states(previous: dict | None, current: dict) -> dict:
    """What changed between the last recorded refresh and this one."""
    previous = previous or {}
    new_examples = _examples_ids(current["examples_uri"])
    added, removed = id_diff(artifact_ids(previous.get("examples_uri"), _examples_ids), new_examples)
    sel_added, sel_removed = id_diff(artifact_ids(previous.get("selection_uri"), _selection_ids),
                                     _selection_ids(current["selection_uri"]))
    return {
        "first_refresh": not previous,
        "source_changed": previous.get("source_fingerprint") != current["source_fingerprint"],
        "examples_changed": previous.get("examples_fingerprint") != current["examples_fingerprint"],
        "selection_changed": previous.get("selection_uri") != current["selection_uri"],
        "fingerprint_before": previous.get("source_fingerprint"),
        "fingerprint_after": current["source_fingerprint"],
        "examples_fingerprint_before": previous.get("examples_fingerprint"),
        "examples_fingerprint_after": current["examples_fingerprint"],
        "examples_before": previous.get("n_examples"), "examples_after": len(new_examples),
        "examples_added": None if added is None else len(added),
        "examples_removed": None if removed is None else len(removed),
        "added_ids": added, "removed_ids": removed,
        "selected_added": None if sel_added is None else len(sel_added),
        "selected_removed": None if sel_removed is None else len(sel_removed),
        "examples_uri_before": previous.get("examples_uri"), "examples_uri": current["examples_uri"],
        "selection_uri_before": previous.get("selection_uri"), "selection_uri": current["selection_uri"],
    }


def _ids_line(ids: list[str] | None) -> str:
    if ids is None:
        return "unknown (no previous examples artifact)"
    if not ids:
        return "none"
    more = f" (+{len(ids) - SHOW_IDS} more)" if len(ids) > SHOW_IDS else ""
    return ", ".join(f"`{i}`" for i in ids[:SHOW_IDS]) + more


def report_markdown(report: dict) -> str:
    verdict = ("first refresh" if report["first_refresh"] else
               "source changed: re-curated" if report["source_changed"] else "source unchanged: every stage cached")
    rows = [("source fingerprint", f"{report['fingerprint_before']} -> {report['fingerprint_after']}"),
            ("examples fingerprint", f"{report['examples_fingerprint_before']} -> {report['examples_fingerprint_after']}"),
            ("examples", f"{report['examples_before']} -> {report['examples_after']}"),
            ("examples added / removed", f"{report['examples_added']} / {report['examples_removed']}"),
            ("selected added / removed", f"{report['selected_added']} / {report['selected_removed']}"),
            ("selection", report["selection_uri"]), ("curate flow run", report["curate_flow_run_id"]),
            ("MLflow run", report["mlflow_run_id"])]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return (f"# Refresh `{report['name']}`: {verdict}\n\n| | |\n|---|---|\n{table}\n\n"
            f"**Added:** {_ids_line(report['added_ids'])}\n\n**Removed:** {_ids_line(report['removed_ids'])}\n")


@flow(name="refresh", flow_run_name=flow_run_name, log_prints=True, persist_result=False)
def refresh(config: CurateConfig = CurateConfig()) -> dict:
    """Re-run the curation if the source data changed (cache hits otherwise) and report what changed."""
    cfg = config if isinstance(config, CurateConfig) else CurateConfig.model_validate(config)
    store_root = ArtifactStore().root
    previous = read_state(cfg.name, store_root)
    fp_now = source_fingerprint(cfg.source)
    print(f"refresh {cfg.name}: source fingerprint {previous.get('source_fingerprint') if previous else None} "
          f"-> {fp_now}")

    summary = curate(cfg)  # subflow: every task a cache hit when nothing it depends on changed

    ex_meta = examples_meta(summary["examples_uri"])
    current = {
        "name": cfg.name, "source": cfg.source.uri, "source_fingerprint": ex_meta.source_fingerprint,
        "examples_uri": summary["examples_uri"], "examples_fingerprint": ex_meta.fingerprint,
        "n_examples": ex_meta.n_examples, "selection_uri": summary["selection_uri"],
        "config_fingerprint": fingerprint(cfg.model_dump()), "updated": time.time(),
        "flow_run_id": str(flow_run.id or ""), "curate_flow_run_id": summary["flow_run_id"],
    }
    report = {"name": cfg.name, **compare_states(previous, current),
              "curate_flow_run_id": summary["flow_run_id"], "curate_mlflow_run_id": summary["mlflow_run_id"]}

    tags = {"sftcurate.kind": "refresh", "prefect.flow_run_id": current["flow_run_id"], "prefect.flow": "refresh",
            "curate_mlflow_run_id": summary["mlflow_run_id"], "source": cfg.source.uri}
    params = {k: report[k] for k in ("fingerprint_before", "fingerprint_after", "examples_fingerprint_before",
                                     "examples_fingerprint_after", "examples_uri", "selection_uri")}
    with tracking.start_run(f"refresh-{cfg.name}", tags=tags, params=params) as run_id:
        report["mlflow_run_id"] = run_id
        link_runs(run_id)
        tracking.log_metrics(run_id, {
            "source_changed": int(report["source_changed"]), "examples_changed": int(report["examples_changed"]),
            "selection_changed": int(report["selection_changed"]), "first_refresh": int(report["first_refresh"]),
            "examples_after": report["examples_after"], "examples_added": report["examples_added"],
            "examples_removed": report["examples_removed"], "selected_added": report["selected_added"],
            "selected_removed": report["selected_removed"]})
        tracking.log_bytes(run_id, json.dumps(report, indent=2, default=str).encode(), "refresh.json")
    report["state_uri"] = write_state(cfg.name, {**current, "mlflow_run_id": run_id}, store_root)

    print(f"refresh {cfg.name}: examples {report['examples_before']} -> {report['examples_after']}, "
          f"added {report['examples_added']}, removed {report['examples_removed']}; "
          f"selection {'changed' if report['selection_changed'] else 'unchanged'}")
    create_markdown_artifact(report_markdown(report), key=f"refresh-{slug(cfg.name)}",
                             description=f"sftcurate refresh of {cfg.name}")
    return report


__all__ = ["refresh", "read_state", "state_uri"]
