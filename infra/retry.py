"""The one retry loop for every dependency reached over a network: the S3 store, an MLflow server, a Prefect API.

An operation that fails because its endpoint did not answer (refused, reset, timed out, no route) is tried again
with exponential backoff. The budget belongs to the outage, not to the call: every call to one endpoint during
one outage, in any thread, shares the clock that started at the first failure. Without that, a run whose store
went down gave up on its write after the budget and then spent a second budget on deleting the half-written
folder, and parallel tasks each waited out their own. And no try may outlast the budget: `seconds_left()` tells
the operation how long it may wait, and the S3 and health-probe requests cap their timeouts with it.

So a run against an endpoint that stays down stops within the budget plus at most one request's timeout.
"""
from __future__ import annotations

import contextvars
import errno
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

# errors of a socket that got no answer (refused, reset, no route, timed out): an outage, not an answer
NETWORK_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EHOSTUNREACH,
                            errno.ENETUNREACH, errno.ENETDOWN, errno.ETIMEDOUT, errno.EPIPE})
FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 15.0
MIN_TRY_SECONDS = 1.0  # a request is given at least this long, even when the budget is spent

T = TypeVar("T")
_left: contextvars.ContextVar[float | None] = contextvars.ContextVar("sftcurate_retry_seconds_left", default=None)


@dataclass
class _Outage:
    started: float     # when the first failed try of this outage began
    last_failure: float


_outages: dict[str, _Outage] = {}
_lock = threading.Lock()


def seconds_left() -> float | None:
    """How long the try in progress may wait for an answer (None outside a retry loop): what is left of the
    outage's budget, at least MIN_TRY_SECONDS."""
    return _left.get()


def _outage(endpoint: str, began: float, budget: float) -> _Outage | None:
    """The outage in progress for `endpoint`, if any. One whose last failure is older than the budget is over:
    nobody has tried since, so a new failure starts a new budget (a long-lived worker outlives many outages)."""
    with _lock:
        outage = _outages.get(endpoint)
        if outage is not None and began - outage.last_failure > budget:
            del _outages[endpoint]
            outage = None
        return outage


def _failed(endpoint: str, began: float) -> _Outage:
    now = time.monotonic()
    with _lock:
        outage = _outages.setdefault(endpoint, _Outage(started=began, last_failure=now))
        outage.last_failure = now
        return outage


def _answered(endpoint: str) -> None:
    with _lock:
        _outages.pop(endpoint, None)


def retry_while_unreachable(operation: Callable[[], T], *, endpoint: str, budget: float,
                            unreachable: Callable[[BaseException], bool],
                            give_up: Callable[[int, float], Exception], log: logging.Logger, what: str) -> T:
    """`operation()`, tried again with backoff while `unreachable(error)`, until `budget` seconds of this
    endpoint's outage have passed; then `give_up(tries, seconds)` is raised from the last error. Any other error
    is raised at once. The operation may run more than once, so it must write or read a whole object."""
    tries, delay = 0, FIRST_BACKOFF_SECONDS
    while True:
        tries += 1
        began = time.monotonic()
        outage = _outage(endpoint, began, budget)
        spent = began - outage.started if outage else 0.0
        token = _left.set(max(MIN_TRY_SECONDS, budget - spent))
        try:
            result = operation()
        except Exception as exc:
            if not unreachable(exc):
                raise
            outage = _failed(endpoint, began)
            elapsed = time.monotonic() - outage.started
            if elapsed >= budget:
                raise give_up(tries, elapsed) from exc
            wait = min(delay, budget - elapsed)
            log.info("%s unreachable (%s); try %d in %.1f s", what, type(exc).__name__, tries + 1, wait)
            time.sleep(wait)
            delay = min(2 * delay, MAX_BACKOFF_SECONDS)
        else:
            _answered(endpoint)
            return result
        finally:
            _left.reset(token)
