"""A local production-like stack on one machine: Prefect server, MLflow tracking server, S3 API (moto).

    python -m sftcurate.infra.services start [--root .sftcurate/services] [--prefect-port 4200] [--mlflow-port 5050] [--s3-port 5055]
    source .sftcurate/services/env.sh      # sftcurate run / deployments / workers now use the stack
    python -m sftcurate.infra.services status
    python -m sftcurate.infra.services stop          # stops exactly the pids recorded in <root>/*.pid

Each server runs in its own session (process group == recorded pid), logs to <root>/<name>.log, and is waited
for over HTTP with a timeout. Everything listens on 127.0.0.1 only; Prefect analytics and MLflow telemetry
are off. The S3 server is moto (test credentials); in production point the same variables at real S3/MinIO.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = Path(".sftcurate") / "services"
ARTIFACTS_BUCKET = "sftcurate-artifacts"
MLFLOW_BUCKET = "sftcurate-mlflow"
MOTO_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
             "AWS_DEFAULT_REGION": "us-east-1"}
ORDER = ("s3", "prefect", "mlflow")
# A recorded pid is only signalled while its command line still names the server we started (pid reuse).
MARKERS = {"s3": "moto_server", "prefect": "prefect", "mlflow": "mlflow"}


class ServiceError(RuntimeError):
    pass


@dataclass
class Ports:
    prefect: int = 4200
    mlflow: int = 5050
    s3: int = 5055


def services_root(root: str | Path | None = None) -> Path:
    return Path(root or os.environ.get("SFTCURATE_SERVICES_DIR") or DEFAULT_ROOT).resolve()


def installed(name: str) -> str | None:
    """The console script `name`: beside this interpreter (the project's virtualenv) first, else on PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def executable(name: str) -> str:
    found = installed(name)
    if not found:
        raise ServiceError(f"{name}: not found next to {sys.executable} or on PATH; run `make install`")
    return found


def urls(ports: Ports) -> dict[str, str]:
    return {"prefect": f"http://127.0.0.1:{ports.prefect}", "mlflow": f"http://127.0.0.1:{ports.mlflow}",
            "s3": f"http://127.0.0.1:{ports.s3}"}


HEALTH = {"prefect": "/api/health", "mlflow": "/health", "s3": "/"}


def client_env(ports: Ports, root: Path, home: Path | None = None) -> dict[str, str]:
    """The settings a client (CLI, worker, flow run) needs to use the stack."""
    u = urls(ports)
    home = (home or (root.parent if root.name == "services" else root / "home")).resolve()
    return {
        "PREFECT_API_URL": f"{u['prefect']}/api",
        "MLFLOW_TRACKING_URI": u["mlflow"],
        "SFTCURATE_STORE": f"s3://{ARTIFACTS_BUCKET}/sftcurate",
        "SFTCURATE_S3_ENDPOINT_URL": u["s3"],
        "MLFLOW_S3_ENDPOINT_URL": u["s3"],
        **MOTO_KEYS,
        "SFTCURATE_HOME": str(home),
        "SFTCURATE_REPO": str(REPO),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


ENV_SH_HEADER = """\
# Written by `python -m sftcurate.infra.services start`: `source {path}` to use the local stack.
# Prefect API (flow runs, deployments, UI at {prefect}), MLflow tracking server (UI at {mlflow}, artifacts
# proxied to s3://{mlflow_bucket}/), the artifact store on the S3 API at {s3} (moto, test credentials).
#
# The artifact store (SFTCURATE_STORE) is the only cache: every process and machine that points at it reuses
# what is committed there. Prefect keeps no task results (nothing is pickled or unpickled).
"""


def write_env_sh(root: Path, env: dict[str, str], ports: Ports) -> Path:
    path = root / "env.sh"
    u = urls(ports)
    lines = [ENV_SH_HEADER.format(path=path, prefect=u["prefect"], mlflow=u["mlflow"], s3=u["s3"],
                                  mlflow_bucket=MLFLOW_BUCKET)]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def read_env_sh(root: str | Path | None = None) -> dict[str, str]:
    env = {}
    for line in (services_root(root) / "env.sh").read_text().splitlines():
        if line.startswith("export "):
            key, _, value = line[len("export "):].partition("=")
            env[key] = shlex.split(value)[0] if value else ""
    return env


# ---------------------------------------------------------------- processes

def pid_file(root: Path, name: str) -> Path:
    return root / f"{name}.pid"


def read_pid(root: Path, name: str) -> int | None:
    try:
        return int(pid_file(root, name).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def is_ours(pid: int, name: str) -> bool:
    """Alive and still the server we started (its command line names it)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            return MARKERS[name] in cmdline.read_bytes().decode(errors="replace")
        except OSError:
            return False
    return True  # no /proc (macOS): trust the pid file


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free for a server
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def healthy(name: str, ports: Ports, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(urls(ports)[name] + HEALTH[name], timeout=timeout) as resp:
            return resp.status < 500
    except Exception:
        return False


def wait_healthy(name: str, ports: Ports, proc: subprocess.Popen | None, log: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if healthy(name, ports):
            return
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise ServiceError(f"{name} exited with code {proc.returncode} while starting; see {log}\n{tail}")
        time.sleep(0.3)
    raise ServiceError(f"{name} did not answer {urls(ports)[name] + HEALTH[name]} within {timeout:.0f}s; see {log}")


def commands(ports: Ports, root: Path) -> dict[str, list[str]]:
    return {
        "s3": [executable("moto_server"), "-H", "127.0.0.1", "-p", str(ports.s3)],
        "prefect": [executable("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(ports.prefect),
                    "--analytics-off"],
        "mlflow": [executable("mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                   "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/", "--host", "127.0.0.1",
                   "--port", str(ports.mlflow), "--workers", "1"],
    }


def server_env(name: str, ports: Ports, root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "MLFLOW_TRACKING_"))}
    env.update({"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true"})
    if name == "prefect":
        env["PREFECT_HOME"] = str(root / "prefect")
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{root / 'prefect.db'}"
        env["PREFECT_UI_API_URL"] = f"{urls(ports)['prefect']}/api"
    if name == "mlflow":
        env.update(MOTO_KEYS)
        env["MLFLOW_S3_ENDPOINT_URL"] = urls(ports)["s3"]
        # The job runner (7 huey consumer processes, for GenAI evaluation jobs) is not used by sftcurate.
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


def launch(name: str, ports: Ports, root: Path) -> subprocess.Popen:
    log = open(root / f"{name}.log", "ab")
    proc = subprocess.Popen(commands(ports, root)[name], cwd=root, env=server_env(name, ports, root),
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    pid_file(root, name).write_text(f"{proc.pid}\n")
    return proc


def make_buckets(ports: Ports) -> None:
    import boto3  # deferred on purpose: boto3 (hundreds of modules), for the local stack's buckets only

    s3 = boto3.client("s3", endpoint_url=urls(ports)["s3"], region_name=MOTO_KEYS["AWS_REGION"],
                      aws_access_key_id=MOTO_KEYS["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=MOTO_KEYS["AWS_SECRET_ACCESS_KEY"])
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    for bucket in (ARTIFACTS_BUCKET, MLFLOW_BUCKET):
        if bucket not in existing:
            s3.create_bucket(Bucket=bucket)


def start(root: str | Path | None = None, ports: Ports | None = None, timeout: float = 180.0,
          home: str | Path | None = None) -> dict[str, str]:
    """Start whatever is not running yet, wait for health, write env.sh; returns the client environment."""
    root = services_root(root)
    root.mkdir(parents=True, exist_ok=True)
    ports_file = root / "ports.json"
    if ports is None:
        ports = Ports(**json.loads(ports_file.read_text())) if ports_file.exists() else Ports()
    procs: dict[str, subprocess.Popen | None] = {}
    try:
        for name in ORDER:
            pid = read_pid(root, name)
            if pid and is_ours(pid, name):
                procs[name] = None  # already running (started earlier)
                continue
            port = getattr(ports, name)
            if not port_free(port):
                raise ServiceError(f"port {port} ({name}) is already in use by another process; pass "
                                   f"--{name}-port or stop that process")
            procs[name] = launch(name, ports, root)
            if name == "s3":  # MLflow's artifact bucket must exist before MLflow starts
                wait_healthy("s3", ports, procs["s3"], root / "s3.log", 30)
                make_buckets(ports)
        for name in ORDER:
            wait_healthy(name, ports, procs[name], root / f"{name}.log", timeout)
    except BaseException:
        for name, proc in procs.items():
            if proc is not None:
                _terminate(proc.pid, name, root)
        raise
    ports_file.write_text(json.dumps(asdict(ports)))
    env = client_env(ports, root, Path(home) if home else None)
    write_env_sh(root, env, ports)
    return env


def _terminate(pid: int, name: str, root: Path, timeout: float = 20.0) -> bool:
    """SIGTERM the process group the server leads (it was started in its own session), then SIGKILL."""
    stopped = False
    if is_ours(pid, name):
        try:
            pgid = os.getpgid(pid)
            send = (lambda sig: os.killpg(pid, sig)) if pgid == pid else (lambda sig: os.kill(pid, sig))
            send(signal.SIGTERM)
            deadline = time.time() + timeout
            while time.time() < deadline and _alive(pid):
                time.sleep(0.2)
            if _alive(pid):
                send(signal.SIGKILL)
            stopped = True
        except ProcessLookupError:
            pass
    pid_file(root, name).unlink(missing_ok=True)
    return stopped


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap our own child; raises for non-children
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            return stat.read_text().split(")")[-1].split()[0] != "Z"  # a zombie is gone
        except OSError:
            return False
    return True


def stop(root: str | Path | None = None) -> list[str]:
    """Stop exactly the servers whose pids are recorded under root (reverse start order)."""
    root = services_root(root)
    stopped = []
    for name in reversed(ORDER):
        pid = read_pid(root, name)
        if pid is not None and _terminate(pid, name, root):
            stopped.append(f"{name} (pid {pid})")
    return stopped


def status(root: str | Path | None = None) -> dict[str, dict]:
    root = services_root(root)
    ports_file = root / "ports.json"
    ports = Ports(**json.loads(ports_file.read_text())) if ports_file.exists() else Ports()
    out = {}
    for name in ORDER:
        pid = read_pid(root, name)
        out[name] = {"pid": pid, "running": bool(pid and is_ours(pid, name)), "healthy": healthy(name, ports),
                     "url": urls(ports)[name]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sftcurate.infra.services", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--root", default=None, help="state folder (pids, logs, databases, env.sh); default "
                        ".sftcurate/services or SFTCURATE_SERVICES_DIR")
    defaults = Ports()
    parser.add_argument("--prefect-port", type=int, default=defaults.prefect)
    parser.add_argument("--mlflow-port", type=int, default=defaults.mlflow)
    parser.add_argument("--s3-port", type=int, default=defaults.s3)
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for each server's health")
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            ports = Ports(args.prefect_port, args.mlflow_port, args.s3_port)
            env = start(args.root, ports, args.timeout)
            root = services_root(args.root)
            print(f"Prefect UI {urls(ports)['prefect']}  MLflow UI {urls(ports)['mlflow']}  S3 {urls(ports)['s3']}")
            print(f"store {env['SFTCURATE_STORE']}; pids and logs in {root}")
            print(f"now: source {root / 'env.sh'}")
        elif args.action == "stop":
            stopped = stop(args.root)
            print("stopped " + ", ".join(stopped) if stopped else "nothing was running")
        else:
            for name, info in status(args.root).items():
                state = "healthy" if info["healthy"] else ("running" if info["running"] else "stopped")
                print(f"{name:8} {state:8} pid {info['pid']}  {info['url']}")
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
