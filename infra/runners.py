"""Task runners chosen by settings: threads on one machine (default), Dask to scale out.

| SFTCURATE_TASK_RUNNER | runner |
|---|---|
| threads (default) | `ThreadPoolTaskRunner` (`SFTCURATE_THREADS` workers, default: Prefect's own) |
| dask | `prefect_dask.DaskTaskRunner`: `SFTCURATE_DASK_ADDRESS` (an existing scheduler, e.g. `tcp://dask:8786`) or a local cluster of `SFTCURATE_DASK_WORKERS` (default 2) worker processes, one thread each |

Ray works the same way through `prefect-ray` (`RayTaskRunner(address=...)`), see docs/production.md; it is
not installed here. Only tasks submitted with `.submit()` / `.map()` go to the runner; plain task calls run
inline in the flow's process.
"""
from __future__ import annotations

import os

from sftcurate.data_contracts.errors import UserError
from sftcurate.infra.settings import load_settings


class TaskRunnerError(UserError):
    """SFTCURATE_TASK_RUNNER names a runner that is unknown or not installed."""


def dask_task_runner(address: str | None = None, workers: int | None = None, processes: bool | None = None):
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    workers = workers or int(os.environ.get("SFTCURATE_DASK_WORKERS", "2"))
    if processes is None:
        processes = os.environ.get("SFTCURATE_DASK_PROCESSES", "true").lower() not in ("0", "false", "no")
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": processes,
                                          "dashboard_address": None})


def task_runner_from_settings(kind: str | None = None):
    """The task runner the settings ask for (evaluated when a flow module is imported, also on workers)."""
    settings = load_settings()
    kind = (kind or settings.task_runner or "threads").lower()
    if kind in ("threads", "thread", "default", ""):
        from prefect.task_runners import ThreadPoolTaskRunner

        threads = os.environ.get("SFTCURATE_THREADS")
        return ThreadPoolTaskRunner(max_workers=int(threads)) if threads else ThreadPoolTaskRunner()
    if kind == "dask":
        return dask_task_runner(settings.dask_address)
    if kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as exc:
            raise TaskRunnerError("SFTCURATE_TASK_RUNNER=ray needs prefect-ray: pip install prefect-ray") from exc
        address = os.environ.get("SFTCURATE_RAY_ADDRESS")
        return RayTaskRunner(address=address) if address else RayTaskRunner()
    raise TaskRunnerError(f"SFTCURATE_TASK_RUNNER={kind}: unknown task runner; use threads, dask or ray")
