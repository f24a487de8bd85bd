"""The evaluation sandbox against programs that try to escape it.

Each attack must be contained, scored as a failure, leave nothing outside its run directory, and leave
the evaluator (this pytest process) alive and able to run the next program. The attacks are real: the
fork bomb really forks, the listener really listens on 127.0.0.1.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.eval.sandbox import Job, Limits, Sandbox, default_root, detect_isolation, python_job

ISO = detect_isolation()
LIMITS = Limits(timeout_s=3.0, cpu_seconds=3, memory_mb=512, file_size_mb=4, max_processes=32)
# Every attack also runs without namespaces where they exist, as on a container without CAP_SYS_ADMIN:
# the fresh uid, rlimits and in-process socket blocking must contain it on their own.
MODES = {"detected": ISO}
if ISO.namespaces and ISO.switch_uid:
    MODES["uid-only"] = replace(ISO, namespaces=False, userns=False)


@pytest.fixture(params=sorted(MODES))
def sandbox(request):
    iso = MODES[request.param]
    root = Path(default_root(iso)) / f"test-{secrets.token_hex(4)}"
    sb = Sandbox(LIMITS, workers=2, root=str(root), isolation=iso)
    yield sb
    leftovers = [p.name for p in root.iterdir() if p.name != "masks.fstab"]
    shutil.rmtree(root, ignore_errors=True)
    assert leftovers == [], f"run directories left behind: {leftovers}"


def run_py(sb: Sandbox, code: str):
    return sb.run(python_job(textwrap.dedent(code), isolation=sb.isolation))


def processes_of(uid: int) -> list[int]:
    """Live processes owned by ``uid``. Zombies are left out: they hold no memory or CPU, only a pid entry, and
    a container whose PID 1 does not reap orphans keeps them whatever the sandbox does."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith("Z"):
            found.append(int(status.parent.name))
    return found


def assert_still_works(sb: Sandbox) -> None:
    r = run_py(sb, "print(sum(range(10)))")
    assert r.passed and r.stdout.strip() == "45", r


def test_ordinary_program_passes_and_failure_is_failure(sandbox):
    ok = run_py(sandbox, "import math\nassert math.factorial(5) == 120\nprint('ok')")
    assert ok.passed and ok.stdout.strip() == "ok"
    bad = run_py(sandbox, "assert 1 + 1 == 3")
    assert bad.status == "failed" and "AssertionError" in bad.stderr


def test_parent_secret_is_not_visible(sandbox, monkeypatch):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("OWNLLM_TEST_SECRET", secret)
    r = run_py(sandbox, f"""
        import os
        found = os.environ.get("OWNLLM_TEST_SECRET")
        if found is None:
            try:  # the evaluator's environment through /proc
                found = open("/proc/{os.getpid()}/environ", "rb").read().decode(errors="replace")
            except OSError:
                pass
        assert found and "{secret[:8]}" in found, "no secret"
        print(found)
    """)
    assert r.status == "failed"
    assert secret not in r.stdout + r.stderr


def test_writes_outside_run_dir_fail_and_leave_no_trace(sandbox, tmp_path):
    if not sandbox.isolation.switch_uid:
        pytest.skip("without root the program runs as the evaluator's user and can write what that user can "
                    "(only the masked tmp dirs are private)")
    token = secrets.token_hex(6)
    targets = [tmp_path / f"escape-{token}", Path.cwd() / f"escape-{token}", sandbox.root / f"escape-{token}",
               Path.home() / f"escape-{token}"]
    scratch = [Path(f"/tmp/ownllm-trace-{token}"), Path(f"/dev/shm/ownllm-trace-{token}"),
               Path(f"/var/tmp/ownllm-trace-{token}")]
    r = run_py(sandbox, f"""
        import sys
        for p in {[str(p) for p in scratch]!r}:  # world-writable dirs: may succeed, but only in a private tmpfs
            try:
                open(p, "w").write("x")
            except OSError:
                pass
        wrote = []
        for p in {[str(p) for p in targets]!r}:
            try:
                open(p, "w").write("pwned")
                wrote.append(p)
            except OSError as e:
                print("denied", p, e, file=sys.stderr)
        sys.exit(0 if wrote else 1)
    """)
    assert r.status == "failed", r
    for p in targets + (scratch if sandbox.isolation.namespaces else []):
        assert not p.exists(), f"trace left at {p}"
    for p in scratch:
        p.unlink(missing_ok=True)
    assert_still_works(sandbox)


def test_tcp_connect_to_localhost_listener_fails(sandbox):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        r = run_py(sandbox, f"""
            import socket
            s = socket.create_connection(("127.0.0.1", {port}), timeout=2)
            s.sendall(b"exfiltrated")
        """)
        # A completed handshake would sit in the backlog even without accept(): none may be there.
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()
    assert r.status == "failed" and "exfiltrated" not in r.stdout, r


def test_memory_bomb_fails_fast(sandbox):
    r = run_py(sandbox, "b = bytearray(10 << 30)\nb[-1] = 1\nprint('allocated')")
    assert r.status == "failed" and "MemoryError" in r.stderr, r
    assert r.duration_s < LIMITS.timeout_s


def test_infinite_loop_is_killed_at_timeout(sandbox):
    r = run_py(sandbox, "while True:\n    pass")
    assert r.status in ("timeout", "failed") and not r.passed
    assert r.duration_s < LIMITS.timeout_s + 2
    assert_still_works(sandbox)


def test_sleeping_children_detached_from_the_group_are_killed(sandbox):
    """A child that leaves the process group (setsid) would survive killpg; the PID namespace / uid sweep gets it."""
    if not sandbox.isolation.switch_uid:
        pytest.skip("process accounting by uid needs root (runs switch to a fresh uid)")
    r = run_py(sandbox, """
        import os, time
        if os.fork() == 0:
            os.setsid()
            time.sleep(60)
            os._exit(0)
        time.sleep(60)
    """)
    assert r.status == "timeout"
    assert r.uid is not None and processes_of(r.uid) == []


def test_fork_bomb_is_contained(sandbox):
    if os.geteuid() == 0 and not sandbox.isolation.switch_uid:
        pytest.skip("root without a uid switch: RLIMIT_NPROC would not bound a fork bomb; refusing to run one")
    # Bounded first: the process limit must stop a loop of 200 forks well before 200.
    bounded = run_py(sandbox, """
        import os, time
        n = 0
        for _ in range(200):
            try:
                if os.fork() == 0:
                    time.sleep(30)
                    os._exit(0)
                n += 1
            except OSError:
                break
        print(n)
    """)
    assert bounded.passed and int(bounded.stdout) < LIMITS.max_processes, bounded
    # Then the real thing.
    r = run_py(sandbox, """
        import os
        while True:
            try:
                os.fork()
            except OSError:
                pass
    """)
    assert not r.passed
    if sandbox.isolation.switch_uid:
        assert processes_of(r.uid) == [] and processes_of(bounded.uid) == []
    assert_still_works(sandbox)


def test_killing_the_parent_and_the_evaluator_fails(sandbox):
    if not (sandbox.isolation.switch_uid or sandbox.isolation.namespaces):
        pytest.skip("neither a fresh uid nor a PID namespace: refusing to let a program try to kill pytest")
    evaluator = os.getpid()
    r = run_py(sandbox, f"""
        import os, signal
        killed = 0
        for pid in {{os.getppid(), {evaluator}}}:
            if pid > 1:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except OSError as e:
                    print("cannot kill", pid, e)
        raise SystemExit(0 if killed else 1)
    """)
    assert r.status == "failed", r
    assert_still_works(sandbox)


def test_many_jobs_run_in_parallel_in_order(sandbox):
    jobs = [python_job(f"print({i} * {i})", isolation=sandbox.isolation) for i in range(8)]
    out = sandbox.map(jobs)
    assert [int(r.stdout) for r in out] == [i * i for i in range(8)]


def test_other_runtimes_run_through_the_same_sandbox(sandbox):
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    job = Job(files={"main.js": "console.log([1,2,3].map(x => x * 2).join(','))"}, argv=["node", "main.js"],
              limits=Limits(timeout_s=10, cpu_seconds=10, memory_mb=4096, max_processes=64))
    r = sandbox.run(job)
    assert r.passed and r.stdout.strip() == "2,4,6", r
