"""Run untrusted programs (model-written code) so that they can only hurt themselves.

Every program runs in its own process tree, never in the evaluator, behind these layers:

- **resource limits** (``prlimit``): CPU seconds, address space, file size, open files and processes;
- **its own unprivileged uid** when the evaluator is root: RLIMIT_NPROC is per uid and does not apply
  to root, so a fork bomb is only bounded once the program runs as a fresh uid that owns nothing else.
  The same uid cannot signal the evaluator or write any file it does not own;
- **namespaces** (``unshare``) where the kernel allows: a new network namespace (only a downed
  loopback: no connection to anything, not even 127.0.0.1), a new PID namespace (the program cannot
  see or name outside processes, and when its first process exits the kernel kills every process left
  in it, daemons included) and a new mount namespace where the world-writable directories (/tmp,
  /var/tmp, /dev/shm, /run/lock) are fresh tmpfs that vanish with it;
- a fresh working directory, removed after the run, and an environment with none of the parent's
  variables;
- a wall-clock timeout after which the whole process group is SIGKILLed.

The chain is built from util-linux binaries (prlimit → unshare → mount → setpriv) rather than a Python
``preexec_fn``: it costs a few milliseconds instead of a fork of the evaluator, keeps ``subprocess`` on
its fast vfork path, and is safe to start from many threads. Where a layer is missing (no root, a
container without CAP_SYS_ADMIN) the rest still apply, :func:`detect_isolation` says which, and
runtimes that can (Python) block sockets in-process before the program runs.
"""

from __future__ import annotations

import functools
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from pipeline.config import SandboxConfig

# World-writable places a program could leave a trace in; each becomes a private tmpfs.
MASKED_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
NAMESPACE_ARGS = ("--net", "--pid", "--fork", "--kill-child", "--mount", "--propagation", "private", "--mount-proc")
USERNS_ARGS = ("--user", "--map-root-user")
TAIL_BYTES = 4096
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0
    cpu_seconds: int = 5
    memory_mb: int = 1024
    file_size_mb: int = 16
    max_processes: int = 64
    max_open_files: int = 256

    @classmethod
    def from_config(cls, cfg: SandboxConfig) -> "Limits":
        return cls(timeout_s=cfg.timeout_s, cpu_seconds=cfg.cpu_seconds, memory_mb=cfg.memory_mb,
                   file_size_mb=cfg.file_size_mb, max_processes=cfg.max_processes)


@dataclass(frozen=True)
class Isolation:
    """Which layers this machine allows (probed once per process by running them for real)."""

    prlimit: bool
    switch_uid: bool  # root: each run gets a fresh unprivileged uid
    namespaces: bool  # network + PID + mount namespaces via unshare
    userns: bool = False  # not root: the namespaces sit inside a user namespace (no uid switch possible)
    uid_pool: tuple[int, int] = (200_000, 1_200_000)

    @property
    def network_blocked(self) -> bool:
        return self.namespaces

    def describe(self) -> str:
        parts = ["rlimits" if self.prlimit else "rlimits (preexec)",
                 "fresh uid" if self.switch_uid else "same uid",
                 ("user+" if self.userns else "") + "net+pid+mount namespaces" if self.namespaces
                 else "no namespaces (sockets blocked in-process)"]
        return ", ".join(parts)


@dataclass
class Execution:
    """The outcome of one program."""

    status: str  # passed | failed | timeout
    returncode: int | None
    duration_s: float
    stdout: str = ""
    stderr: str = ""
    uid: int | None = None  # the fresh uid it ran as, if any

    @property
    def passed(self) -> bool:
        return self.status == "passed"


@dataclass
class Job:
    """A program to run: files written into its fresh directory and the command, relative to it."""

    files: dict[str, str]
    argv: list[str]
    limits: Limits | None = None  # overrides the sandbox's own limits (e.g. a runtime that needs more memory)
    meta: dict = field(default_factory=dict)


def _uid_pool() -> tuple[int, int]:
    """Uids we may switch to: a range well inside this user namespace's uid map, away from real users."""
    try:
        lines = Path("/proc/self/uid_map").read_text().split()
        rows = [tuple(int(x) for x in lines[i:i + 3]) for i in range(0, len(lines), 3)]
        start, _, count = max(rows, key=lambda r: r[2])
    except (OSError, ValueError):
        start, count = 0, 65536
    lo = start + min(200_000, count // 2)
    hi = start + min(count - 2, 1_200_000)  # count - 1 would be the overflow uid
    return (lo, hi) if hi > lo + 1000 else (start + count // 2, start + count - 2)


def _run_quiet(argv: list[str], timeout: float = 10.0) -> bool:
    try:
        return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=timeout, env={"PATH": SAFE_PATH}, cwd="/").returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@functools.cache
def detect_isolation() -> Isolation:
    """Probe each layer by using it; a layer is only claimed once it has worked here."""
    has_prlimit = shutil.which("prlimit") is not None and _run_quiet(["prlimit", "--nofile=64", "--", "true"])
    pool = _uid_pool()
    switch_uid = (os.geteuid() == 0 and shutil.which("setpriv") is not None
                  and _run_quiet(["setpriv", f"--reuid={pool[0]}", f"--regid={pool[0]}", "--clear-groups", "--", "true"]))
    # Without root, the namespaces need a user namespace around them (where the kernel allows unprivileged ones).
    userns = os.geteuid() != 0
    namespaces = shutil.which("unshare") is not None and shutil.which("mount") is not None and _run_quiet(
        ["unshare", *(USERNS_ARGS if userns else ()), *NAMESPACE_ARGS,
         "--", "mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", "/tmp"])
    return Isolation(prlimit=has_prlimit, switch_uid=switch_uid, namespaces=namespaces, userns=userns and namespaces,
                     uid_pool=pool)


def default_root(isolation: Isolation) -> str:
    """Where run directories go: never under a masked dir, or the program would not see its own files."""
    if isolation.namespaces:
        return "/run/ownllm-sandbox" if not isolation.userns else os.path.expanduser("~/.cache/ownllm-sandbox")
    return os.path.join(tempfile.gettempdir(), "ownllm-sandbox")


def _mask_fstab(path: Path) -> None:
    # A source name of our own: `mount -a` skips entries that look already mounted (e.g. tmpfs on /dev/shm).
    lines = [f"ownllm-sandbox {d} tmpfs rw,nosuid,nodev,size=16m,mode=1777 0 0" for d in MASKED_DIRS if os.path.isdir(d)]
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)  # several evaluators may share the root: never let mount read a half-written file


class Sandbox:
    """Runs :class:`Job` s under the layers of :func:`detect_isolation`, one worker per core."""

    def __init__(self, limits: Limits = Limits(), workers: int | None = None, root: str | None = None,
                 isolation: Isolation | None = None):
        self.limits = limits
        self.workers = workers or os.cpu_count() or 1
        self.isolation = isolation or detect_isolation()
        self.root = Path(root or default_root(self.isolation))
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)  # others may traverse to their own run dir, not list the rest
        self.fstab = self.root / "masks.fstab"
        _mask_fstab(self.fstab)
        self._uids_in_use: set[int] = set()
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------- one run
    def run(self, job: Job) -> Execution:
        limits = job.limits or self.limits
        uid = self._take_uid() if self.isolation.switch_uid else None
        workdir = Path(tempfile.mkdtemp(prefix="run-", dir=self.root))
        out_path, err_path = workdir.with_suffix(".out"), workdir.with_suffix(".err")
        execution = None
        try:
            for name, text in job.files.items():
                target = workdir / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
            if uid is not None:
                for p in [workdir, *workdir.rglob("*")]:
                    os.chown(p, uid, uid)
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                execution = self._execute(self._command(job.argv, limits, uid), workdir, limits, out, err, uid)
            # The run dir's random name would make reports differ between identical runs.
            execution.stdout, execution.stderr = (_tail(p).replace(str(workdir), ".") for p in (out_path, err_path))
            execution.uid = uid
            return execution
        finally:
            if uid is not None and ((execution is None or execution.status == "timeout") or not self.isolation.namespaces):
                # After a kill, the namespace is torn down asynchronously; without one, a detached child
                # could outlive the group. Either way: nothing of this uid may outlive the run.
                _kill_uid(uid)
            shutil.rmtree(workdir, ignore_errors=True)
            for p in (out_path, err_path):
                p.unlink(missing_ok=True)
            if uid is not None:
                self._release_uid(uid)

    def _command(self, argv: Sequence[str], limits: Limits, uid: int | None) -> list[str]:
        cmd: list[str] = []
        if self.isolation.prlimit:
            cmd += ["prlimit", f"--cpu={limits.cpu_seconds}", f"--as={limits.memory_mb << 20}",
                    f"--fsize={limits.file_size_mb << 20}", f"--nofile={limits.max_open_files}",
                    f"--nproc={limits.max_processes}", "--core=0", "--"]
        if self.isolation.namespaces:
            cmd += ["unshare", *(USERNS_ARGS if self.isolation.userns else ()), *NAMESPACE_ARGS,
                    "--", "sh", "-c", f'mount -a -T {self.fstab} && exec "$@"', "sandbox"]
        if uid is not None:
            cmd += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs",
                    "--inh-caps=-all", "--"]
        return cmd + list(argv)

    def _execute(self, cmd: list[str], workdir: Path, limits: Limits, out, err, uid: int | None) -> Execution:
        env = {"PATH": SAFE_PATH, "HOME": str(workdir), "TMPDIR": str(workdir), "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True, close_fds=True,
                                preexec_fn=None if self.isolation.prlimit else _preexec_limits(limits))
        # A timer kills at the deadline while this thread blocks in waitpid: Popen.wait(timeout=...) polls
        # with sleeps of up to 50 ms, which was most of the sandbox's overhead on short programs.
        timed_out = threading.Event()
        timer = threading.Timer(limits.timeout_s, self._kill_tree, args=(proc, uid, timed_out))
        timer.daemon = True
        timer.start()
        try:
            proc.wait()
        finally:
            timer.cancel()
            if timer.is_alive():
                timer.join()
        if not self.isolation.namespaces:
            # Without a PID namespace, children left in the group would outlive the run.
            _killpg(proc.pid)
        rc = proc.returncode
        status = "timeout" if timed_out.is_set() else ("passed" if rc == 0 else "failed")
        return Execution(status=status, returncode=rc,
                         duration_s=time.monotonic() - start)

    @staticmethod
    def _kill_tree(proc: subprocess.Popen, uid: int | None, timed_out: threading.Event) -> None:
        timed_out.set()
        if uid is not None:
            # Kill the program's processes first and let `unshare` reap its namespace's init: killing
            # `unshare` first would orphan that init to a PID 1 that may never reap it (a zombie).
            _kill_uid(uid)
            deadline = time.monotonic() + 2
            while proc.returncode is None and time.monotonic() < deadline:
                time.sleep(0.01)
        if proc.returncode is None:  # not reaped yet, so the pgid still names this tree only
            _killpg(proc.pid)

    def _take_uid(self) -> int:
        lo, hi = self.isolation.uid_pool
        with self._lock:
            while True:
                uid = lo + secrets.randbelow(hi - lo)
                if uid not in self._uids_in_use:
                    self._uids_in_use.add(uid)
                    return uid

    def _release_uid(self, uid: int) -> None:
        with self._lock:
            self._uids_in_use.discard(uid)

    # ------------------------------------------------------------------------------------ many runs
    def map(self, jobs: Sequence[Job], desc: str = "sandbox") -> list[Execution]:
        """Run jobs in parallel (threads only wait on child processes), results in input order."""
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(tqdm(pool.map(self.run, jobs), total=len(jobs), desc=desc, unit="prog", leave=False,
                             disable=None))


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - TAIL_BYTES))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def live_pids(uid: int) -> list[int]:
    """Processes of ``uid`` that are not zombies (a zombie holds no memory or CPU, only a pid entry)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:  # exited while we looked
            continue
        if fields.get("Uid", "").split()[:1] == [str(uid)] and not fields.get("State", "").strip().startswith("Z"):
            found.append(int(status.parent.name))
    return found


def _kill_uid(uid: int, wait_s: float = 5.0) -> None:
    """SIGKILL every process of ``uid`` until none is left alive.

    ``kill -9 -- -1`` run as that uid reaches exactly its own processes; its exit status is not a reliable
    "nothing left" signal, so /proc is checked instead.
    """
    deadline = time.monotonic() + wait_s
    while True:
        _run_quiet(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", "kill", "-9", "--", "-1"])
        if not live_pids(uid) or time.monotonic() > deadline:
            return
        time.sleep(0.01)


def _preexec_limits(limits: Limits):
    """Fallback when ``prlimit`` is missing: set the same limits in the forked child before exec."""
    import resource

    def apply() -> None:
        for res, value in ((resource.RLIMIT_CPU, limits.cpu_seconds), (resource.RLIMIT_AS, limits.memory_mb << 20),
                           (resource.RLIMIT_FSIZE, limits.file_size_mb << 20),
                           (resource.RLIMIT_NOFILE, limits.max_open_files),
                           (resource.RLIMIT_NPROC, limits.max_processes), (resource.RLIMIT_CORE, 0)):
            resource.setrlimit(res, (value, value))

    return apply


# Python programs get this first when the machine cannot give them a network namespace.
PYTHON_NO_NETWORK = '''\
def _ownllm_block_network():
    import _socket, socket
    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in the evaluation sandbox")
    for mod in (_socket, socket):
        for name in ("socket", "socketpair", "create_connection", "create_server", "fromfd", "getaddrinfo"):
            if hasattr(mod, name):
                setattr(mod, name, refuse)
_ownllm_block_network()
del _ownllm_block_network
'''


def python_argv(script: str = "main.py") -> list[str]:
    """Run a script with the evaluator's interpreter, isolated (-I) and without site-packages (-S)."""
    import sys

    return [os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable), "-I", "-S", script]


def python_job(program: str, limits: Limits | None = None, isolation: Isolation | None = None,
               meta: dict | None = None) -> Job:
    iso = isolation or detect_isolation()
    prelude = "" if iso.network_blocked else PYTHON_NO_NETWORK
    return Job(files={"main.py": prelude + program}, argv=python_argv("main.py"), limits=limits, meta=meta or {})


def sandbox_from_config(cfg: SandboxConfig) -> Sandbox:
    return Sandbox(Limits.from_config(cfg), workers=cfg.workers, root=cfg.root)
