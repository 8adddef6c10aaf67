"""What every task shares: a cross-run cache policy keyed on content, and retry settings.

Prefect's default cache key includes the flow run id, so nothing would be reused across runs. Ours is
inputs (URIs, fingerprints, small parameters; never the MLflow run id) + the task's source + the source of
the module that holds the task's math, so a code change invalidates exactly what it could have changed.
"""
from __future__ import annotations

from dataclasses import dataclass

from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

from infra.hashing import code_fingerprint

SHARED_CODE = ("tasks.tokenize", "data_contracts.schemas", "data_contracts.tensors", "infra.store")
# Modules whose math a task's module delegates to: a change there must invalidate that task's cache too.
EXTRA_CODE = {
    "tasks.ingest": ("tasks.formats",),
    "tasks.judge": ("tasks.judge_backends",),
    "tasks.selection": ("tasks.selectors.base", "tasks.selectors.uniform", "tasks.selectors.fishersft",
                        "tasks.selectors.s2l", "tasks.selectors.density", "tasks.selectors.askllm", "tasks.fisher"),
    "tasks.evaluate": ("tasks.finetune", "tasks.training"),
    "tasks.finetune": ("tasks.training",),
    "tasks.proxy": ("tasks.training",),
}


@dataclass
class ModuleSource(CachePolicy):
    """Key on the source of the module defining the task (its plain functions) and the shared modules."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        module = task_ctx.task.fn.__module__
        return code_fingerprint(module, *SHARED_CODE, *EXTRA_CODE.get(module, ()))


def retry_unless_user_error(task, task_run, state) -> bool:
    """Retry crashes and flaky IO, never bad input: a bad file fails the same way every time."""
    from data_contracts.errors import UserError

    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # the result itself may be unreadable; retrying is the safe choice
        return True
    return not isinstance(exc, UserError)


def run_committed(task_fn, *args, **kwargs) -> str:
    """Call a task that returns an artifact URI; if a cache hit points at an artifact that is gone (a wiped
    store), run it again with the cache refreshed instead of handing a dangling URI downstream."""
    from infra.store import is_committed

    uri = task_fn(*args, **kwargs)
    if isinstance(uri, str) and not is_committed(uri):
        uri = task_fn.with_options(refresh_cache=True)(*args, **kwargs)
    return uri


def n_shards(n: int, shard_size: int) -> int:
    return max(1, -(-n // shard_size))


def shard_bounds(n: int, shard_index: int, shard_size: int) -> tuple[int, int]:
    """[lo, hi) of pool rows that shard `shard_index` owns."""
    return min(n, shard_index * shard_size), min(n, (shard_index + 1) * shard_size)


def map_tasks(task_fn, arg_tuples: list[tuple]) -> list:
    """Run a task once per argument tuple: submitted to the flow's task runner (threads, Dask) inside a flow so
    workers share the shards, one after another outside one. Results come back in argument order."""
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is not None:
        return [future.result() for future in [task_fn.submit(*args) for args in arg_tuples]]
    return [task_fn(*args) for args in arg_tuples]


def task_logger(name: str):
    """Prefect's run logger inside a flow or task run (shown in the UI), a plain logger outside one."""
    import logging

    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # outside a flow or task run
        return logging.getLogger(name)


CACHE = (INPUTS - "run_id") + TASK_SOURCE + ModuleSource()
RETRIES = {"retries": 2, "retry_delay_seconds": 2, "retry_condition_fn": retry_unless_user_error}
TASK_DEFAULTS = {"cache_policy": CACHE, "persist_result": True, **RETRIES}
