"""The real binaries the chart runs, on loopback: which flags `moe <role> --help` lists, whether
clap accepts a container's arguments, and what the processes serve where the probes look.

Every role is started as the chart starts it (same listening flags, loopback port 0): an expert
node hosting every expert of the tiny fixture model, a router on it (`--experts-at`), a 1-member
etcd (Debian's etcd-server) and a coordinator on that etcd.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

FLAG = re.compile(r"^\s+(?:-\w, )?(--[a-z0-9][a-z0-9-]*)", re.M)
ENV = re.compile(r"\[env: (MOE_[A-Z0-9_]+)=")


class Help:
    """Flags and environment variables one role's `--help` lists."""

    def __init__(self, moe: Path, role: str):
        out = subprocess.run([str(moe), role, "--help"], capture_output=True, text=True, check=True)
        self.flags = set(FLAG.findall(out.stdout))
        self.env = set(ENV.findall(out.stdout))
        if not self.flags:
            raise AssertionError(f"moe {role} --help lists no flags:\n{out.stdout}")


def accepts(moe: Path, command: list[str], args: list[str]) -> str | None:
    """None when clap parses `moe COMMAND... ARGS` (every flag known, every value of the right
    type), else its error. `--help` last stops the command before it runs."""
    out = subprocess.run([str(moe), *command, *args, "--help"], capture_output=True, text=True)
    return None if out.returncode == 0 else out.stderr.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process whose stdout lines are collected as they come."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None):
        self.argv = argv
        self.p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.cv = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            with self.cv:
                self.lines.append(line.rstrip("\n"))
                self.cv.notify_all()
        with self.cv:
            self.cv.notify_all()

    def wait_line(self, pattern: str, timeout: float = 60) -> re.Match:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cv:
            while True:
                for line in self.lines:
                    if m := rx.search(line):
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or self.p.poll() is not None:
                    raise AssertionError(f"{self.argv[:2]}: no line /{pattern}/ in:\n"
                                         + "\n".join(self.lines[-30:]))
                self.cv.wait(min(left, 0.5))

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def http_status(host_port: str, path: str) -> int | None:
    host, port = host_port.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        c.request("GET", path)
        return c.getresponse().status
    except OSError:
        return None
    finally:
        c.close()


def wait_http_ok(host_port: str, path: str, timeout: float = 30) -> int | None:
    """Polls `path` until it answers 200 (as a kubelet probe would), returning the last status."""
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = http_status(host_port, path)
        if status == 200:
            return status
        time.sleep(0.2)
    return status


def tcp_open(host_port: str) -> bool:
    host, port = host_port.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
        return True
    except OSError:
        return False


class Cluster:
    """Every role running on loopback; `addr[role][flag]` is where that listening flag bound."""

    def __init__(self, moe: Path, model: Path):
        self.procs: list[Proc] = []
        self.tmp = tempfile.mkdtemp(prefix="moe-helm-")
        self.addr: dict[str, dict[str, str]] = {}
        etcd = shutil.which("etcd")
        if etcd is None:
            raise AssertionError("etcd not found: .ci/run installs Debian's etcd-server")
        try:
            self._start(moe, model, etcd)
        except BaseException:
            self.stop()
            raise

    def _start(self, moe: Path, model: Path, etcd: str):
        env = {"MOE_LOG": "warn"}
        c, p, m = free_port(), free_port(), free_port()
        e = Proc([etcd, "--name", "t", "--data-dir", f"{self.tmp}/etcd",
                  "--listen-client-urls", f"http://127.0.0.1:{c}",
                  "--advertise-client-urls", f"http://127.0.0.1:{c}",
                  "--listen-peer-urls", f"http://127.0.0.1:{p}",
                  "--initial-advertise-peer-urls", f"http://127.0.0.1:{p}",
                  "--initial-cluster", f"t=http://127.0.0.1:{p}",
                  "--listen-metrics-urls", f"http://127.0.0.1:{m}"])
        self.procs.append(e)
        self.addr["etcd"] = {"--listen-client-urls": f"127.0.0.1:{c}",
                             "--listen-peer-urls": f"127.0.0.1:{p}",
                             "--listen-metrics-urls": f"127.0.0.1:{m}"}
        node = Proc([str(moe), "expert-node", "--model", str(model), "--experts", "*:*",
                     "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"], env)
        self.procs.append(node)
        grpc = node.wait_line(r"listening on (\S+)").group(1)
        self.addr["expert-node"] = {"--listen": grpc,
                                    "--metrics-listen": node.wait_line(r"metrics on (\S+)").group(1)}
        router = Proc([str(moe), "router", "--model", str(model), "--experts-at", grpc,
                       "--listen", "127.0.0.1:0"], env)
        self.procs.append(router)
        self.addr["router"] = {"--listen": router.wait_line(r"listening on (\S+)").group(1)}
        if wait_http_ok(f"127.0.0.1:{m}", "/health", timeout=30) != 200:
            raise AssertionError("loopback etcd did not become healthy")
        coord = Proc([str(moe), "coordinator", "--model", str(model), "--etcd",
                      f"http://127.0.0.1:{c}", "--metrics-listen", "127.0.0.1:0"], env)
        self.procs.append(coord)
        self.addr["coordinator"] = {"--metrics-listen": coord.wait_line(r"metrics on (\S+)").group(1)}

    def stop(self):
        for p in reversed(self.procs):
            p.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)
