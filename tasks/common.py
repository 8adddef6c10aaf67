"""What every task shares: one way to wrap a library stage as a Prefect task, retries, mapping, logging.

Tasks keep no cache of their own and persist no result: the artifact store is the only cache
(`infra.stages.build_once`). A stage task returns its artifact URI as a string and ends in a state named
"Reused" when the artifact was already committed, "Completed" when this run built it, so the Prefect UI shows
what was reused.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from prefect.states import Completed
from prefect.task_runners import ThreadPoolTaskRunner

from sftcurate.data_contracts.errors import DependencyError, UserError, disk_full
from sftcurate.infra import progress
from sftcurate.infra.runners import mapped_tasks


def retry_unless_user_error(task, task_run, state) -> bool:
    """Retry crashes and flaky IO, never bad input (a bad file fails the same way every time), a dependency
    that stayed down through its own retry budget (infra.store.StorageUnavailable: Prefect's retries on top
    would multiply SFTCURATE_STORAGE_RETRY_SECONDS) nor a full disk (still full two seconds later)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # the result itself may be unreadable; retrying is the safe choice
        return True
    return not (isinstance(exc, (UserError, DependencyError)) or disk_full(exc))


RETRIES = {"retries": 2, "retry_delay_seconds": 2, "retry_condition_fn": retry_unless_user_error}
TASK_DEFAULTS = {"cache_policy": NO_CACHE, "persist_result": False, **RETRIES}


def stage_task(name: str):
    """Decorate a function that calls one library stage (returning `infra.stages.Built`) as a Prefect task."""

    def wrap(fn):
        @task(name=name, **TASK_DEFAULTS)
        @functools.wraps(fn)
        def run(*args, **kwargs):
            with progress_in_run_log(name):
                built = fn(*args, **kwargs)
            if getattr(built, "reused", False):
                return Completed(data=str(built), name="Reused", message=f"reused {built}")
            return Completed(data=str(built), message=f"built {built}")

        run.stage = fn  # the plain call, for use outside a flow run
        return run

    return wrap


LOG_EVERY_SECONDS = 15.0


@contextlib.contextmanager
def progress_in_run_log(name: str, every: float = LOG_EVERY_SECONDS):
    """The loop progress the terminal shows as a bar, as a line in the Prefect run log every `every` seconds
    (and at the end of each loop), so the UI shows where a long task is. Only this thread's loops: under the
    thread runner other tasks report to their own loggers."""
    logger, thread, last = task_logger(name), threading.get_ident(), [0.0]

    def on_event(section: str, event: str, detail: dict) -> None:
        if event != "step" or threading.get_ident() != thread:
            return
        now, done = time.monotonic(), detail["step"] >= detail["steps"]
        if now - last[0] < every and not done:
            return
        last[0] = now
        loss = detail.get("loss")
        logger.info("%s: %d/%d %s%s", section, detail["step"], detail["steps"], detail.get("unit") or "steps",
                    f", loss {loss:.4f}" if loss is not None else "")

    unsubscribe = progress.subscribe(on_event)
    try:
        yield
    finally:
        unsubscribe()


def call(task_fn, *args, **kwargs) -> str:
    """Run a stage task in the flow's process and return its artifact URI (outside a flow: the plain call)."""
    if FlowRunContext.get() is None:
        return str(task_fn.stage(*args, **kwargs))
    return task_fn(*args, return_state=True, **kwargs).result()


def map_tasks(task_fn, arg_tuples: list[tuple]) -> list[str]:
    """Run a stage task once per argument tuple: submitted to the flow's task runner (threads, Dask) inside a
    flow so workers share the shards, one after another outside one. URIs come back in argument order."""
    context = FlowRunContext.get()
    if context is not None:
        # on the thread runner the tasks share this process's cores: one torch thread each when as many run at
        # once as there are threads (infra/runners.py); other runners run them in their own processes
        workers = getattr(context.task_runner, "_max_workers", None)
        sharing = (mapped_tasks(len(arg_tuples), workers) if isinstance(context.task_runner, ThreadPoolTaskRunner)
                   and workers else contextlib.nullcontext())
        with sharing:
            return [future.result() for future in [task_fn.submit(*args) for args in arg_tuples]]
    return [str(task_fn.stage(*args)) for args in arg_tuples]


def task_logger(name: str):
    """Prefect's run logger inside a flow or task run (shown in the UI), a plain logger outside one."""
    try:
        return get_run_logger()
    except Exception:  # outside a flow or task run
        return logging.getLogger(name)
