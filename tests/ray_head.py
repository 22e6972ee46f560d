"""A real local Ray head on loopback, with token authentication, for job-submission tests.

`ray_head()` starts `ray start --head --block` with every port chosen free, a private temp dir
and its own auth token, yields a `RayHead`, and always stops exactly the processes it started
(never `ray stop`, which would kill every Ray on the machine). `submit_job()` runs
`ray job submit` against it the way a user would.

Token authentication: Ray enables it when RAY_AUTH_MODE=token (for `ray.init()` local clusters
by default since 2.59; `ray start` turns it on only when the mode is set or a token already
exists). The token is read from RAY_AUTH_TOKEN, else the file at RAY_AUTH_TOKEN_PATH, else
~/.ray/auth_token. We set the mode and a private token file explicitly on both sides — the
head and the CLI — so the tests neither depend on nor write to the user's ~/.ray.

Use the session fixture `job_head` (tests/conftest.py), or `from ray_head import ray_head`
(pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
AUTH_ENV_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@dataclass(frozen=True)
class RayHead:
    """A running local head: where to submit jobs and the environment the CLI needs."""

    address: str  # job-submission (dashboard) address, http://127.0.0.1:<port>
    gcs_address: str  # 127.0.0.1:<port>, for `ray status --address`
    env: Mapping[str, str]  # the caller's environment plus auth and PATH for the venv
    temp_dir: Path
    token: str


def free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports that were free a moment ago."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def head_env(temp_dir: Path, token_in_home: bool) -> tuple[dict[str, str], str]:
    """Environment for the head and its clients, and the token they share.

    Token auth on, the venv's bin first on PATH. The token is either a private file named by
    RAY_AUTH_TOKEN_PATH, or (token_in_home) made by `ray get-auth-token --generate` in a private
    HOME, as the docs tell users to do.
    """
    env = {k: v for k, v in os.environ.items() if k not in AUTH_ENV_VARS}
    env.update(RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    # The job's driver must import the uploaded working_dir, not a path left by the test runner.
    env.pop("PYTHONPATH", None)
    if token_in_home:
        env["HOME"] = str(temp_dir / "home")
        subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
        token_path = temp_dir / "home" / ".ray" / "auth_token"
    else:
        token_path = temp_dir / "auth_token"
        token_path.write_text(secrets.token_hex(32))  # what `ray get-auth-token --generate` makes
        token_path.chmod(0o600)
        env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    return env, token_path.read_text().strip()


def _wait_for_dashboard(address: str, proc: subprocess.Popen, timeout_s: float) -> None:
    """Block until the job API answers (any HTTP status means the server is up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # 401 without a token: the server is up and enforcing auth
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    raise TimeoutError(f"Ray dashboard at {address} did not answer within {timeout_s:.0f}s")


def _stop(proc: subprocess.Popen, temp_dir: Path) -> None:
    """Stop the head we started: SIGTERM to `ray start --block`, then kill any leftovers.

    Leftovers are found by our private temp dir in their command line, so no other Ray on the
    machine is touched.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for pid in _pids_mentioning(str(temp_dir)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _pids_mentioning(marker: str) -> list[int]:
    """Processes whose command line contains `marker` (Linux /proc; empty elsewhere)."""
    pids = []
    for d in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if marker.encode() in (d / "cmdline").read_bytes() and int(d.name) != os.getpid():
                pids.append(int(d.name))
    return pids


@contextlib.contextmanager
def ray_head(num_cpus: int = 2, timeout_s: float = 120, token_in_home: bool = False) -> Iterator[RayHead]:
    """Start a real Ray head on loopback with token auth; stop it on exit, even on failure."""
    # Short path: Ray puts unix sockets under it and those are limited to ~107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="srh-", dir="/tmp"))
    env, token = head_env(temp_dir, token_in_home)
    (gcs, dashboard, agent_http, agent_grpc, runtime_env_agent, metrics, client, node_manager,
     object_manager) = free_ports(9)
    cmd = [
        RAY, "start", "--head", "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={runtime_env_agent}",
        f"--metrics-export-port={metrics}",
        f"--ray-client-server-port={client}",
        f"--node-manager-port={node_manager}",
        f"--object-manager-port={object_manager}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        "--object-store-memory=200000000",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    log = (temp_dir / "ray-start.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        try:
            _wait_for_dashboard(address, proc, timeout_s)
        except Exception as e:
            raise RuntimeError(f"{e}\n--- ray start output ---\n{head_log(temp_dir)}") from None
        yield RayHead(address, f"127.0.0.1:{gcs}", env, temp_dir, token)
    finally:
        _stop(proc, temp_dir)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def head_log(temp_dir: Path, tail: int = 4000) -> str:
    """The last characters of `ray start`'s output, for error messages."""
    path = temp_dir / "ray-start.log"
    return path.read_text(errors="replace")[-tail:] if path.exists() else ""


def submit_job(
    head: RayHead,
    entrypoint: Sequence[str],
    working_dir: Path,
    runtime_env: Mapping | None = None,
    runtime_env_file: Path | None = None,
    submission_id: str | None = None,
    timeout_s: float = 1200,  # `spine-ray train` on the smoke config: ~3 min idle, far more on a busy machine
) -> tuple[str, subprocess.CompletedProcess]:
    """`ray job submit --address … --working-dir … [--runtime-env FILE | --runtime-env-json …] -- <entrypoint>`.

    The CLI streams the job's logs and returns when the job ends; returns (submission id, result).
    """
    submission_id = submission_id or f"spine-ray-test-{secrets.token_hex(4)}"
    cmd = [
        RAY, "job", "submit", "--address", head.address, "--submission-id", submission_id,
        "--working-dir", str(working_dir), "--log-style=record", "--log-color=false",
    ]
    if runtime_env_file is not None:
        cmd += ["--runtime-env", str(runtime_env_file)]
    if runtime_env:
        cmd += ["--runtime-env-json", json.dumps(dict(runtime_env))]
    cmd += ["--", *entrypoint]
    result = subprocess.run(cmd, env=dict(head.env), capture_output=True, text=True, timeout=timeout_s)
    return submission_id, result


def job_client(head: RayHead):
    """A `JobSubmissionClient` for the head, given the token as an explicit bearer header."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token}"})
