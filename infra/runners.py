"""Task runners chosen by settings: threads on one machine (default), Dask to scale out.

| SFTCURATE_TASK_RUNNER | runner |
|---|---|
| threads (default) | `ThreadPoolTaskRunner` with one worker per CPU thread this process may use (`cpu_threads`) |
| dask | `prefect_dask.DaskTaskRunner`: `SFTCURATE_DASK_ADDRESS` (an existing scheduler, e.g. `tcp://dask:8786`) or a local cluster of `SFTCURATE_DASK_WORKERS` (default 2) worker processes, one thread each |

CPU threads. A process may use `SFTCURATE_THREADS` threads (else OMP_NUM_THREADS when the user set it, else the
cores in its affinity mask: `taskset`, a container's cpuset). sftcurate processes running on the machine at the
same time (each registers itself while it runs) split those between them, and shard tasks mapped on the thread
runner split their process's share: torch's intra-op threads (and OpenMP/BLAS for libraries loaded later) are set
to `max(1, threads // processes // tasks running at once)`. Two runs that each started as many torch threads as
there are cores, plus shard tasks on threads, oversubscribed the CPU tenfold (issue 27); sharing keeps two runs
side by side to about twice their time alone. Re-balanced whenever a stage starts (`balance_threads`).

Ray works the same way through `prefect-ray` (`RayTaskRunner(address=...)`), see docs/production.md; it is
not installed here. Only tasks submitted with `.submit()` / `.map()` go to the runner; plain task calls run
inline in the flow's process.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import sys
import tempfile
import threading
from pathlib import Path

from threadpoolctl import threadpool_limits

from sftcurate.data_contracts.errors import UserError
from sftcurate.infra.settings import SettingsError, load_settings

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_USER_OMP_THREADS = os.environ.get("OMP_NUM_THREADS")  # before this module sets it for the libraries it loads
_balance = threading.Lock()
_mapped_at_once = [1]  # shard tasks the thread runner runs at once right now (1 outside a mapped section)
_registered: list[Path] = []


class TaskRunnerError(UserError):
    """SFTCURATE_TASK_RUNNER names a runner that is unknown or not installed."""


def dask_task_runner(address: str | None = None, workers: int | None = None, processes: bool | None = None):
    # deferred on purpose: optional extra: prefect-dask, for SFTCURATE_TASK_RUNNER=dask only
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
        # deferred on purpose: Prefect (seconds): infra stays importable without it
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=cpu_threads())
    if kind == "dask":
        return dask_task_runner(settings.dask_address)
    if kind == "ray":
        try:
            # deferred on purpose: optional extra: prefect-ray, for SFTCURATE_TASK_RUNNER=ray only
            from prefect_ray import RayTaskRunner
        except ImportError as exc:
            raise TaskRunnerError("SFTCURATE_TASK_RUNNER=ray needs prefect-ray: pip install prefect-ray") from exc
        address = os.environ.get("SFTCURATE_RAY_ADDRESS")
        return RayTaskRunner(address=address) if address else RayTaskRunner()
    raise TaskRunnerError(f"SFTCURATE_TASK_RUNNER={kind}: unknown task runner; use threads, dask or ray")


def cpu_threads() -> int:
    """The CPU threads this process may use: SFTCURATE_THREADS, else a user's OMP_NUM_THREADS, else the cores in
    its affinity mask."""
    for name, raw in (("SFTCURATE_THREADS", os.environ.get("SFTCURATE_THREADS")),
                      ("OMP_NUM_THREADS", _USER_OMP_THREADS)):
        raw = (raw or "").strip()
        if raw:
            if not raw.isdigit() or int(raw) < 1:
                raise SettingsError(f"{name}={raw!r}: expected a whole number of threads >= 1, e.g. {name}=2")
            return int(raw)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def running_folder() -> Path:
    """Where sftcurate processes on this machine register while they run (per user, in the temporary folder)."""
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"sftcurate-{uid}" / "running"


def register_process() -> None:
    """Count this process among the running ones until it exits (once per process)."""
    if _registered:
        return
    mark = running_folder() / str(os.getpid())
    mark.parent.mkdir(parents=True, exist_ok=True)
    mark.touch()
    _registered.append(mark)
    atexit.register(lambda: mark.unlink(missing_ok=True))


def running_processes() -> int:
    """Registered sftcurate processes alive now, this one included (marks of dead ones are removed)."""
    alive = {os.getpid()} if _registered else set()
    folder = running_folder()
    for mark in folder.iterdir() if folder.is_dir() else ():
        if not mark.name.isdigit():
            continue
        pid = int(mark.name)
        if pid == os.getpid() or _alive(pid):
            alive.add(pid)
        else:
            mark.unlink(missing_ok=True)
    return max(1, len(alive))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def thread_share() -> int:
    """Threads for each torch op now: this process's share of the CPU among the running sftcurate processes,
    divided among the shard tasks running at once."""
    return max(1, cpu_threads() // running_processes() // _mapped_at_once[0])


def set_threads(n: int) -> None:
    """torch's intra-op threads when torch is loaded; for OpenMP and BLAS libraries not loaded yet, their
    variables (read when they load)."""
    for name in THREAD_VARIABLES:
        os.environ[name] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)


def balance_threads() -> int:
    """Set this process's threads to its share now (the CLI calls it when a run starts and at every stage)."""
    with _balance:
        n = thread_share()
        set_threads(n)
    return n


@contextlib.contextmanager
def one_thread():
    """torch and every loaded BLAS/OpenMP library on one thread while inside, restored afterwards: for loops of
    small ops (the CPU greedies' 256-row blocks). With torch's OpenMP pool and numpy's OpenBLAS pool both at two
    threads on two cores, each pool's threads spin while the other works: `sftcurate select fishersft` at
    N=20,000 took 70 s against 15 s with OpenBLAS on one thread (a 256-row float16 conversion: 5 ms, not 0.04)."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    try:
        with threadpool_limits(limits=1):
            if torch is not None:
                torch.set_num_threads(1)
            yield
    finally:
        if torch is not None:
            torch.set_num_threads(before)


@contextlib.contextmanager
def mapped_tasks(count: int, workers: int):
    """While `count` tasks are mapped on a thread runner of `workers` workers: each torch op gets the threads of
    the process divided by the tasks running at once (one each when there are as many tasks as threads); the
    threads are restored afterwards."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    with _balance:
        at_once = max(1, min(count, workers))
        _mapped_at_once[0] = at_once
        base = before if before is not None else max(1, cpu_threads() // running_processes())
        set_threads(max(1, base // at_once))
    try:
        yield
    finally:
        with _balance:
            _mapped_at_once[0] = 1
            set_threads(before if before is not None else base)
