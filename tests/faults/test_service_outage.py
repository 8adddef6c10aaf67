"""Issue 11, fault 3 for the other servers: an unreachable MLflow tracking server or Prefect API.

Measured before the fix: MLFLOW_TRACKING_URI on a closed port gave up after 4 min 41 s (MLflow's 7 retries with
backoff, per request) with a boxed traceback; PREFECT_API_URL on a closed port failed in 4 s with three chained
tracebacks (`RuntimeError: Failed to reach API`). Now both wait with backoff for SFTCURATE_SERVICE_RETRY_SECONDS,
then print one line naming the URL and the setting, exit 1; a server that comes back within the budget is used.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from sftcurate.data_contracts.errors import DependencyError, UserError
from tests.conftest import free_port, wait_http
from tests.faults.full import when_full
from tests.helpers import stop

pytestmark = pytest.mark.faults

CONFIG = """name: service-outage
source: {uri: 'builtin:python-docs', limit: 40}
selection: {method: uniform, budget: 5}
models: {target: tiny-gpt2, max_length: 64}
"""
# A real HTTP server in its own process, so a test can stop (SIGSTOP) and continue it like a stalled host.
HEALTH_SERVER = """
import http.server, sys
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path.endswith("/health") else 404)
        self.end_headers()
        self.wfile.write(b"OK")
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


MLFLOW_HTTP_VARS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT")


@pytest.fixture(autouse=True)
def _restore_mlflow_http_settings():
    """A tracking server URI makes infra.tracking set MLflow's per-request retry settings for the process."""
    saved = {k: os.environ.get(k) for k in MLFLOW_HTTP_VARS}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def start_health_server(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HEALTH_SERVER, str(port)])
    wait_http(f"http://127.0.0.1:{port}/health", timeout=30)
    return proc


def test_a_closed_port_raises_service_unavailable_after_the_budget(monkeypatch):
    from sftcurate.infra.reachability import ServiceUnavailable, wait_reachable

    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("SFTCURATE_SERVICE_RETRY_SECONDS", "2")
    start = time.perf_counter()
    with pytest.raises(ServiceUnavailable) as info:
        wait_reachable(url + "/health", what="MLflow tracking server", url=url, setting="MLFLOW_TRACKING_URI")
    took = time.perf_counter() - start
    assert 2.0 <= took < 10, took
    message = str(info.value)
    assert message.startswith(f"MLflow tracking server {url} unreachable after ") and " tries over 2 s; " in message
    assert message.endswith("check MLFLOW_TRACKING_URI and the network") and "\n" not in message
    assert isinstance(info.value, DependencyError) and not isinstance(info.value, UserError)


def test_a_server_answering_with_an_error_status_is_reachable(monkeypatch):
    """A 404 (or a 401 from a server that wants a key) is an answer: no waiting, no ServiceUnavailable."""
    from sftcurate.infra.reachability import wait_reachable

    port = free_port()
    proc = start_health_server(port)
    try:
        start = time.perf_counter()
        wait_reachable(f"http://127.0.0.1:{port}/not-health", what="x", url="x", setting="X", budget=30)
        assert time.perf_counter() - start < 5
    finally:
        stop(proc)


def test_a_stall_shorter_than_the_budget_is_survived_and_a_longer_one_is_not(monkeypatch):
    """SIGSTOP the server: it still accepts connections (the kernel does) but never answers, like a hung host."""
    from sftcurate.infra.reachability import ServiceUnavailable, wait_reachable

    port = free_port()
    proc = start_health_server(port)
    url = f"http://127.0.0.1:{port}"
    try:
        proc.send_signal(signal.SIGSTOP)
        resume = threading.Timer(2.0, proc.send_signal, (signal.SIGCONT,))
        resume.start()
        start = time.perf_counter()
        wait_reachable(url + "/health", what="Prefect API", url=url, setting="PREFECT_API_URL", budget=20)
        took = time.perf_counter() - start
        resume.join()
        assert 1.9 <= took < 15, f"the probe did not wait for the stalled server ({took:.1f}s)"

        proc.send_signal(signal.SIGSTOP)  # stalled for longer than a 3 s budget
        start = time.perf_counter()
        with pytest.raises(ServiceUnavailable, match=f"Prefect API {url} unreachable after"):
            wait_reachable(url + "/health", what="Prefect API", url=url, setting="PREFECT_API_URL", budget=3)
        took = time.perf_counter() - start
        assert 3.0 <= took < 10, took
    finally:
        stop(proc)


def test_a_server_that_comes_back_within_the_budget_is_used(monkeypatch):
    from sftcurate.infra.reachability import wait_reachable

    port = free_port()
    procs: list[subprocess.Popen] = []
    restart = threading.Timer(1.5, lambda: procs.append(subprocess.Popen([sys.executable, "-c", HEALTH_SERVER,
                                                                           str(port)])))
    restart.start()
    try:
        start = time.perf_counter()
        wait_reachable(f"http://127.0.0.1:{port}/health", what="x", url="x", setting="X", budget=60)
        assert time.perf_counter() - start >= 1.4
    finally:
        restart.join()
        for proc in procs:
            stop(proc)


def test_tracking_calls_wait_out_an_outage_mid_run_then_stop_within_the_budget(monkeypatch):
    """After the first contact every MlflowClient call is retried for the budget, and MLflow's own per-request
    retries (minutes by default) are cut short, so the budget bounds a call."""
    from sftcurate.infra import tracking
    from sftcurate.infra.reachability import ServiceUnavailable

    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SFTCURATE_SERVICE_RETRY_SECONDS", "2")
    for var in MLFLOW_HTTP_VARS:
        monkeypatch.delenv(var, raising=False)
    start = time.perf_counter()
    with pytest.raises(ServiceUnavailable, match=f"MLflow tracking server {uri} unreachable"):
        tracking.client()  # the first contact probes /health
    assert 2.0 <= time.perf_counter() - start < 10
    tracking._opened.add(uri)  # as if the server went away after the run started
    tracking._bound_mlflow_http_retries(2)
    start = time.perf_counter()
    with pytest.raises(ServiceUnavailable) as info:
        tracking.log_metrics("0" * 32, {"loss": 1.0})
    took = time.perf_counter() - start
    assert 2.0 <= took < 25, took
    assert str(info.value).endswith("check MLFLOW_TRACKING_URI and the network")


def run_cli(tmp_path, env_updates: dict) -> tuple[subprocess.CompletedProcess, float]:
    config = tmp_path / "tiny.yaml"
    config.write_text(CONFIG)
    env = {**os.environ, "SFTCURATE_STORE": str(tmp_path / "artifacts"), "COLUMNS": "200", **env_updates}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "from sftcurate.cli import app; app()", "run", str(config)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return proc, time.perf_counter() - start


def assert_one_line(proc, starts: str, setting: str, stdout: str | None = None, stderr: str | None = None) -> None:
    stdout, stderr = (proc.stdout, proc.stderr) if stdout is None else (stdout, stderr)
    assert proc.returncode == 1, stderr[-4000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr[-4000:]
    assert errors[0].startswith(starts) and f"check {setting} and the network" in errors[0], errors[0]
    assert "Traceback" not in stderr + stdout and "╭" not in stderr, stderr[-4000:]


def test_cli_one_line_exit_1_when_the_prefect_api_is_unreachable(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/api"
    proc, took = run_cli(tmp_path, {"PREFECT_API_URL": url, "SFTCURATE_SERVICE_RETRY_SECONDS": "3"})
    assert_one_line(proc, f"error: Prefect API {url} unreachable after ", "PREFECT_API_URL")
    assert took < 60, f"{took:.0f}s"
    assert not (tmp_path / "artifacts").exists()  # nothing ran


def test_cli_one_line_exit_1_when_the_tracking_server_is_unreachable(prefect_harness, tmp_path):
    from prefect.settings import PREFECT_API_URL

    uri = f"http://127.0.0.1:{free_port()}"
    proc, took = run_cli(tmp_path, {"MLFLOW_TRACKING_URI": uri, "SFTCURATE_SERVICE_RETRY_SECONDS": "3",
                                    "PREFECT_API_URL": PREFECT_API_URL.value() or ""})
    assert_one_line(proc, f"error: MLflow tracking server {uri} unreachable after ", "MLFLOW_TRACKING_URI")
    assert took < 60, f"{took:.0f}s"


def test_a_tracking_server_lost_after_the_cli_checked_it_still_ends_in_one_line(prefect_harness, tmp_path,
                                                                               store_root, monkeypatch):
    """The server goes away between the CLI's check and the flow's first tracking call: the flow's own wait
    raises ServiceUnavailable, and the CLI prints it as one line, exit 1."""
    from typer.testing import CliRunner

    import sftcurate.cli as cli
    import sftcurate.cli_flows as cli_flows

    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SFTCURATE_SERVICE_RETRY_SECONDS", "2")
    monkeypatch.setattr(cli_flows, "wait_for_services", lambda: None)  # it was up when the CLI looked
    config = tmp_path / "tiny.yaml"
    config.write_text(CONFIG)
    result = CliRunner().invoke(cli.app, ["run", str(config)], env={"COLUMNS": "200"})
    assert result.exit_code == 1, (result.output[-3000:], result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: MLflow tracking server {uri} unreachable after")
    assert "Traceback" not in result.output


def test_bad_service_budget_setting_is_a_user_error(monkeypatch):
    from sftcurate.infra.settings import SettingsError, load_settings

    monkeypatch.setenv("SFTCURATE_SERVICE_RETRY_SECONDS", "-1")
    with pytest.raises(SettingsError, match="SFTCURATE_SERVICE_RETRY_SECONDS='-1'"):
        load_settings()


LONG_RUN = """name: prefect-lost
source: {{uri: {data}, heldout_fraction: 0.1}}
selection: {{method: s2l, budget: 6, params: {{clusters: 3}}}}
models: {{target: tiny-gpt2, max_length: 64}}
proxy: {{steps: 400, checkpoints: 4, batch_size: 8}}
"""


def start_prefect_server(port: int, home) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
                               "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{port}/api/health", timeout=120)
    return server


@pytest.mark.parametrize("budget", when_full([5], [5, 90]))
def test_a_prefect_server_lost_mid_run_ends_in_one_line_within_the_budget(tmp_path, budget):
    """Measured before the fix (default budget): the run went on for 293 s after the server was killed, then
    ended in a boxed traceback (`httpx.ConnectError`) among 446 lines of stderr ("Error logging to API", every
    unsent event in full). Now a watch on the server stops the run one budget after the server went away. With a
    budget longer than Prefect's own retries of a request (about a minute), the flow fails first and the CLI
    waits out the rest of the budget before it says the server is gone."""
    from tests.helpers import qa_records, write_jsonl

    port = free_port()
    server = start_prefect_server(port, tmp_path / "prefect-home")
    url = f"http://127.0.0.1:{port}/api"
    config = tmp_path / "lost.yaml"
    config.write_text(LONG_RUN.format(data=write_jsonl(tmp_path / "pool.jsonl", qa_records(80))))
    env = {**os.environ, "PREFECT_API_URL": url, "SFTCURATE_STORE": str(tmp_path / "artifacts"),
           "SFTCURATE_HOME": str(tmp_path / "home"), "SFTCURATE_SERVICE_RETRY_SECONDS": str(budget),
           "COLUMNS": "200"}
    run = subprocess.Popen([sys.executable, "-c", "from sftcurate.cli import app; app()", "run", str(config)],
                           cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not (tmp_path / "artifacts" / "proxy").exists() and run.poll() is None:
            time.sleep(0.1)  # the run is inside its flow, training the proxy
        server.kill()
        server.wait()
        killed_at = time.perf_counter()
        out, err = run.communicate(timeout=budget + 240)
    finally:
        server.kill()
        run.kill()
    took = time.perf_counter() - killed_at
    print(f"budget {budget} s: the run stopped {took:.1f} s after its Prefect server was killed; "
          f"{len(err.splitlines())} lines on stderr")
    assert_one_line(run, f"error: Prefect API {url} unreachable after ", "PREFECT_API_URL", out, err)
    assert budget <= took < budget + 20, took
    assert len(err.splitlines()) <= 10, err[-4000:]


def test_a_watch_calls_on_lost_once_the_budget_is_spent_and_says_which_way_a_failed_run_went():
    """The watch in one process: a server that goes away is reported once, one budget after its first missed
    probe; a run that failed on a network error first hears either 'unreachable' or 'answers again'."""
    from sftcurate.infra.reachability import ServiceUnavailable, Watch

    port = free_port()
    server = start_health_server(port)
    lost: list[tuple[float, ServiceUnavailable]] = []
    url = f"http://127.0.0.1:{port}"
    watch = Watch(f"{url}/health", what="Test server", url=url, setting="TEST_URL", every=0.2, budget=1.5,
                  on_lost=lambda error: lost.append((time.perf_counter(), error)))
    with watch:
        time.sleep(0.6)
        assert not lost  # answering: nothing to report
        back = watch.lost_during_run(ConnectionRefusedError())
        assert "answers again now; run the command again" in str(back)
        stop(server)
        gone_at = time.perf_counter()
        deadline = gone_at + 10
        while not lost and time.perf_counter() < deadline:
            time.sleep(0.05)
    assert len(lost) == 1, "the watch did not report a server that stayed away"
    assert 1.3 <= lost[0][0] - gone_at < 4.0, lost[0][0] - gone_at  # the first missed probe may start as it stops
    assert str(lost[0][1]).startswith(f"Test server {url} unreachable after ")
    gone = watch.lost_during_run(ConnectionRefusedError())  # the outage's budget is spent: one try, then the verdict
    assert isinstance(gone, ServiceUnavailable) and "check TEST_URL and the network" in str(gone)


def test_only_a_request_to_the_prefect_api_counts_as_the_prefect_server_lost():
    import httpx

    from sftcurate.cli_flows import prefect_api_error

    api = "http://127.0.0.1:4200/api"
    lost = httpx.ConnectError("All connection attempts failed", request=httpx.Request("POST", f"{api}/task_runs/"))
    assert prefect_api_error(lost, api)
    try:
        try:
            raise lost
        except httpx.ConnectError as exc:
            raise RuntimeError("the engine could not set the task run's state") from exc
    except RuntimeError as wrapped:
        assert prefect_api_error(wrapped, api)
    judge = httpx.ConnectError("refused", request=httpx.Request("POST", "http://127.0.0.1:9/v1/chat/completions"))
    assert not prefect_api_error(judge, api)  # a judge's endpoint, not Prefect
    assert not prefect_api_error(httpx.ReadError("x", request=httpx.Request("GET", f"{api}/x")), api + "2")
    assert not prefect_api_error(ValueError("bad input"), api)
