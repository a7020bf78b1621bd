"""A real Flower deployment on 127.0.0.1 for tests and benchmarks: one SuperLink (Flower's, started by
`fedcollm.engines.flower.superlink`: its full API on a local port, only the Fleet API on the port SuperNodes
reach, its state in a database file) and one `flower-supernode` per client as separate processes, TLS and
SuperNode authentication on, and the fedcollm app submitted with `flwr run`. The same commands, one machine each,
are the README's "Run across machines".
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedcollm.errors import RunDirError

SCRIPTS = Path(__file__).resolve().parents[4] / "scripts"
APP = Path(__file__).resolve().parents[4] / "flower_app"
CONNECTION = "fedcollm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (Flower detaches its SuperExec into a session of its own)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    children = [int(p) for p in out]
    return children + [d for c in children for d in _descendants(c)]


def _renice_session(pid: int, nice: int) -> None:
    """Give the session that `pid` leads (every process here starts its own) this niceness. With Linux's autogroup
    scheduling, a process's own niceness counts only against processes of its session; between sessions the
    session's niceness counts (/proc/PID/autogroup), so both are set. ClientApp processes started later inherit."""
    if nice:
        os.setpriority(os.PRIO_PROCESS, pid, nice)
        autogroup = Path(f"/proc/{pid}/autogroup")
        if autogroup.exists():
            autogroup.write_text(str(nice))


class LoopbackFederation:
    """SuperLink + SuperNodes on this machine; use as a context manager, which kills every process it started."""

    def __init__(self, workdir: Path, nodes: int, tls: bool = True, auth: bool = True, worker: bool = True,
                 client_nice: int = 0, node_config: dict[int, str] | None = None, apart: bool = False):
        """worker: each SuperNode runs `--isolation process` with a long-lived `fedcollm clientapp-worker`
        (False: Flower's default, a fresh `flwr-clientapp` process per message). Every node gets an equal share
        of this machine's cores (OMP_NUM_THREADS), as it would have its own machine's cores. client_nice: the
        niceness of every SuperNode and its ClientApp processes, which stand in for other machines: while the
        server computes, their idle polls then yield to it rather than compete with its threads. node_config:
        more of SuperNode k's node config (e.g. `data-config="/its/own.toml"`). apart: every party (SuperLink,
        each SuperNode with its worker, the `flwr` CLI) runs with its own HOME and working directory,
        WORKDIR/homes/NAME, as on a machine of its own."""
        self.work, self.nodes, self.tls, self.auth, self.worker = Path(workdir), nodes, tls, auth, worker
        self.client_nice, self.node_config, self.apart = client_nice, node_config or {}, apart
        self.port = free_port()  # the SuperLink's full API: the operator's `flwr` CLI, the SuperExec
        self.fleet_port = free_port()  # the Fleet API alone: what SuperNodes (clients) reach
        self.database = self.work / "superlink.db"  # registered SuperNodes and runs survive a SuperLink restart
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = os.environ | {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                                 "PYTHONUNBUFFERED": "1"}
        self.node_threads = str(max(1, (os.cpu_count() or 1) // nodes))

    # ---- lifecycle ----------------------------------------------------------------------------------------------
    def __enter__(self) -> "LoopbackFederation":
        self.work.mkdir(parents=True, exist_ok=True)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _home(self, name: str) -> dict:
        home = self.work / "homes" / name
        home.mkdir(parents=True, exist_ok=True)
        return self.env | {"FLWR_HOME": str(home)} | ({"HOME": str(home)} if self.apart else {})

    def _spawn(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
        log = open(self.work / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=env["FLWR_HOME"] if self.apart else None)
        self.procs[name] = proc
        return proc

    def _start(self) -> None:
        certs, keys = self.work / "certs", self.work / "keys"
        if self.tls:
            subprocess.run(["bash", str(SCRIPTS / "gen_certs.sh"), str(certs)], check=True, capture_output=True)
        if self.auth:
            names = [f"node{k}" for k in range(self.nodes)]
            subprocess.run(["bash", str(SCRIPTS / "gen_node_keys.sh"), str(keys), *names], check=True,
                           capture_output=True)
        self.tls_link = (["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.crt"),
                          "--ssl-keyfile", str(certs / "server.key")] if self.tls else ["--insecure"])
        self.tls_node = ["--root-certificates", str(certs / "ca.crt")] if self.tls else ["--insecure"]
        (self.work / "homes" / "cli").mkdir(parents=True, exist_ok=True)
        security = f'root-certificates = "{certs / "ca.crt"}"' if self.tls else "insecure = true"
        (self.work / "homes" / "cli" / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\n{security}\n')
        self.start_superlink()
        for k in range(self.nodes):
            if self.auth:
                self.flwr("supernode", "register", str(keys / f"node{k}.pub"), CONNECTION, "--name", f"node{k}",
                          "--format", "json")
            self.start_node(k)
        self._wait_for_log_lines("SuperNode ID:", [f"node{k}" for k in range(self.nodes)])

    def start_superlink(self) -> None:
        """Start the SuperLink; restarting a killed one is the same call, and it keeps its database."""
        self._spawn("superlink", [sys.executable, "-m", "fedcollm.engines.flower.superlink", "--fleet-address",
                                  f"127.0.0.1:{self.fleet_port}", *self.tls_link,
                                  *(["--enable-supernode-auth"] if self.auth else []), "--host", "127.0.0.1",
                                  "--port", str(self.port), "--database", str(self.database),
                                  "--disable-runtime-dependency-installation"], self._home("superlink"))
        self._wait_for_port(self.port, "superlink")
        self._wait_for_port(self.fleet_port, "superlink")

    def start_node(self, k: int, partitions: int | None = None) -> None:
        """Start SuperNode k (partition-id k); restarting a killed one is the same call."""
        keys = self.work / "keys"
        auth = ["--auth-supernode-private-key", str(keys / f"node{k}")] if self.auth else []
        isolation = ["--isolation", "process"] if self.worker else []
        runtime, env = free_port(), self._home(f"node{k}") | {"OMP_NUM_THREADS": self.node_threads}
        procs = [self._spawn(f"node{k}", ["flower-supernode", *self.tls_node, *auth, *isolation, "--superlink",
                                          f"127.0.0.1:{self.fleet_port}", "--host", "127.0.0.1",
                                          "--port", str(runtime),
                                          "--node-config", f"partition-id={k} num-partitions={partitions or self.nodes} "
                                          f"{self.node_config.get(k, '')}".strip()],
                             env)]
        if self.worker:
            procs.append(self._spawn(f"worker{k}", ["fedcollm", "clientapp-worker", "--runtime-api-address",
                                                    f"127.0.0.1:{runtime}"], env))
        for proc in procs:
            _renice_session(proc.pid, self.client_nice)

    def kill(self, name: str) -> None:
        """SIGKILL one process and everything it started; a SuperNode dies with its worker (a machine that dies)."""
        procs = [self.procs.pop(name)]
        if name.startswith("node") and f"worker{name[4:]}" in self.procs:
            procs.append(self.procs.pop(f"worker{name[4:]}"))
        for proc in procs:
            for pid in _descendants(proc.pid) + [proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()

    def pause(self, name: str, resume: bool = False) -> None:
        """SIGSTOP (or, with resume, SIGCONT) one process: a client machine that hangs without disconnecting."""
        os.kill(self.procs[name].pid, signal.SIGCONT if resume else signal.SIGSTOP)

    def stop(self) -> None:
        while self.procs:
            self.kill(next(iter(self.procs)))

    # ---- runs ---------------------------------------------------------------------------------------------------
    def flwr(self, *args: str, cwd: Path | None = None) -> str:
        done = subprocess.run(["flwr", *args], env=self._home("cli"), cwd=cwd, capture_output=True, text=True,
                              timeout=120)
        if done.returncode:
            raise RuntimeError(f"flwr {' '.join(args)} failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")
        return done.stdout

    def submit(self, run_config: dict) -> int:
        """`flwr run` of the fedcollm app with these run-config values; returns the run id."""
        cfg = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
        out = json.loads(self.flwr("run", str(APP), CONNECTION, "--format", "json", "--run-config", cfg))
        if not out.get("success"):
            raise RuntimeError(f"flwr run refused the app: {out}")
        return int(out["run-id"])

    def status(self, run_id: int) -> str:
        runs = json.loads(self.flwr("ls", CONNECTION, "--run-id", str(run_id), "--format", "json"))["runs"]
        return runs[0]["status"]

    def logs(self, run_id: int) -> str:
        try:
            return self.flwr("log", str(run_id), CONNECTION, "--show")
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            return str(err)

    def wait(self, run_id: int, timeout: float, poll: float = 2.0, done_file: Path | None = None) -> str:
        """Block until the run finishes; returns its status (e.g. finished:completed), raising on a time-out.

        Each poll is a `flwr ls` process (about a second of CPU to import flwr). A benchmark names `done_file`, a
        file the run writes as it ends: checking it costs nothing, so `flwr ls` is asked only once it exists or
        every `poll` seconds (to notice a failed run), and the harness takes no CPU from the run it times."""
        deadline = time.monotonic() + timeout
        asked = -math.inf
        while time.monotonic() < deadline:
            if done_file is None or done_file.exists() or time.monotonic() - asked >= poll:
                asked = time.monotonic()
                status = self.status(run_id)
                if status.startswith("finished"):
                    return status
            time.sleep(poll if done_file is None else 1.0)
        raise TimeoutError(f"run {run_id} still {self.status(run_id)!r} after {timeout:.0f} s\n"
                           f"{self.process_logs()}\n--- flwr log {run_id} ---\n{self.logs(run_id)[-3000:]}")

    def process_logs(self, tail: int = 1500) -> str:
        """The last lines of every process's log and whether it still runs: what a hung run needs explained."""
        parts = []
        for name, proc in self.procs.items():
            state = "running" if proc.poll() is None else f"exited {proc.returncode}"
            text = (self.work / f"{name}.log").read_text(errors="replace")[-tail:]
            parts.append(f"--- {name} ({state}) ---\n{text}")
        return "\n".join(parts)

    # ---- helpers ------------------------------------------------------------------------------------------------
    def _wait_for_port(self, port: int, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise RunDirError(f"{name} exited: {(self.work / f'{name}.log').read_text()[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"{name} did not open port {port} in {timeout} s")

    def _wait_for_log_lines(self, needle: str, names: list[str], timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(needle in (self.work / f"{n}.log").read_text() for n in names):
                return
            time.sleep(0.2)
        raise TimeoutError(f"not every SuperNode connected in {timeout} s; see {self.work}")
