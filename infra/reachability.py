"""Servers a run needs besides the artifact store: an MLflow tracking server and a Prefect API.

An unreachable server (connection refused or reset, no route, a timeout: a server that is down, restarting or
stalled) is retried with exponential backoff for SFTCURATE_SERVICE_RETRY_SECONDS (default 120), then the run
stops with `ServiceUnavailable`, one line naming the URL and the setting to check (the CLI exits 1). A server
that answers, even with an error status, is reachable: a 401 or a 500 is an answer that waiting does not change.

Prefect-free: the CLI reads PREFECT_API_URL from Prefect's settings and passes it in.
"""
from __future__ import annotations

import logging
import threading
import urllib.error
import urllib.request
from typing import Callable, TypeVar

from sftcurate.data_contracts.errors import DependencyError, chain
from sftcurate.infra.retry import NETWORK_ERRNOS, retry_while_unreachable, seconds_left
from sftcurate.infra.settings import load_settings

PROBE_TIMEOUT_SECONDS = 10.0  # one health request: a stalled server accepts the connection and never answers

log = logging.getLogger("sftcurate.reachability")
T = TypeVar("T")


class ServiceUnavailable(DependencyError):
    """A tracking server or Prefect API stayed unreachable for SFTCURATE_SERVICE_RETRY_SECONDS."""


def _network_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        import requests  # deferred on purpose: optional: whichever HTTP clients are installed (requests ~0.1 s)

        types += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    except ImportError:  # pragma: no cover
        pass
    try:
        import urllib3  # deferred on purpose: optional (see requests above)

        types += [urllib3.exceptions.NewConnectionError, urllib3.exceptions.MaxRetryError,
                  urllib3.exceptions.ProtocolError, urllib3.exceptions.TimeoutError]
    except ImportError:  # pragma: no cover
        pass
    try:
        import httpx  # deferred on purpose: optional (see requests above)

        types += [httpx.TransportError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def unreachable(exc: BaseException | None) -> bool:
    """Whether an error, or any error it was raised from or while handling, says the server did not answer.
    MLflow raises its own exception while handling the `requests` one, so the implicit context counts too."""
    network = _network_types()
    for e in chain(exc):
        if isinstance(e, urllib.error.HTTPError):  # a status code: the server answered
            return False
        if isinstance(e, network) or (isinstance(e, OSError) and e.errno in NETWORK_ERRNOS):
            return True
        if isinstance(e, urllib.error.URLError) and isinstance(e.reason, (OSError, TimeoutError)):
            return True
    return False


def message(what: str, url: str, tries: int, elapsed: float, setting: str) -> str:
    return (f"{what} {url} unreachable after {tries} {'try' if tries == 1 else 'tries'} over {elapsed:.0f} s; "
            f"check {setting} and the network")


def retrying(operation: Callable[[], T], *, what: str, url: str, setting: str, budget: float | None = None) -> T:
    """`operation()`, tried again with backoff while the server cannot be reached, until `budget` seconds
    (SFTCURATE_SERVICE_RETRY_SECONDS) of the outage have passed (`infra.retry`); then ServiceUnavailable. Any
    other error is raised at once. The operation may run more than once."""
    return retry_while_unreachable(
        operation, endpoint=url, budget=load_settings().service_retry_seconds if budget is None else budget,
        unreachable=unreachable, give_up=lambda tries, elapsed: ServiceUnavailable(message(what, url, tries, elapsed,
                                                                                           setting)),
        log=log, what=f"{what} {url}")


def probe(url: str, timeout: float = PROBE_TIMEOUT_SECONDS) -> None:
    """One GET of a health URL; returns when the server answers anything (an error status included)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            response.read(1)
    except urllib.error.HTTPError:
        return


def wait_reachable(health_url: str, *, what: str, url: str, setting: str, budget: float | None = None) -> None:
    """Probe `health_url` until the server answers, within the budget; ServiceUnavailable naming `url` and
    `setting` otherwise. No probe waits longer than what is left of the budget (at least 1 s)."""
    retrying(lambda: probe(health_url, timeout=min(PROBE_TIMEOUT_SECONDS, seconds_left() or PROBE_TIMEOUT_SECONDS)),
             what=what, url=url, setting=setting, budget=budget)


def wait_for_prefect_api(api_url: str | None, budget: float | None = None) -> None:
    """A run against a Prefect server (PREFECT_API_URL set) first waits for its health endpoint; an ephemeral
    Prefect (no URL) has nothing to wait for here."""
    if not api_url:
        return
    wait_reachable(api_url.rstrip("/") + "/health", what="Prefect API", url=api_url, setting="PREFECT_API_URL",
                   budget=budget)


class Watch:
    """Watches a server while a block of work runs (`with Watch(...) as watch:`): a daemon thread probes
    `health_url` every `every` seconds. A probe that gets no answer starts the wait of `wait_reachable`, on the
    outage's clock (`infra.retry`); when the budget is spent, `on_lost(ServiceUnavailable)` runs in the watching
    thread and the caller decides how to stop (the CLI prints one line and exits: the work's own client may be
    stuck in retries of its own). Calls made by the work itself are not slowed down."""

    def __init__(self, health_url: str, *, what: str, url: str, setting: str,
                 on_lost: Callable[[ServiceUnavailable], None], every: float = 5.0, budget: float | None = None):
        self.health_url, self.what, self.url, self.setting = health_url, what, url, setting
        self.on_lost, self.every, self.budget = on_lost, every, budget
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"watch {url}", daemon=True)

    def __enter__(self) -> "Watch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()

    def _wait(self) -> None:
        wait_reachable(self.health_url, what=self.what, url=self.url, setting=self.setting, budget=self.budget)

    def _watch(self) -> None:
        while not self._done.wait(self.every):
            try:
                self._wait()
            except ServiceUnavailable as exc:
                if not self._done.is_set():
                    self.on_lost(exc)
                return

    def lost_during_run(self, exc: BaseException) -> ServiceUnavailable:
        """The work failed because the server did not answer (its client's own retries ran out first): wait for
        the server within what is left of the outage's budget, and say which way it went, in one line."""
        try:
            self._wait()
        except ServiceUnavailable as gone:
            return gone
        return ServiceUnavailable(f"{self.what} {self.url} stopped answering during the run ({type(exc).__name__}) "
                                  "and answers again now; run the command again (committed artifacts are reused)")
