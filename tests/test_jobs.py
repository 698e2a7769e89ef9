"""The job runner: child processes, JSON progress, success hooks, failures, the queue bound, cancel and shutdown."""

import asyncio
import sys
import textwrap

import pytest

from server.errors import Conflict, NotFound, Overloaded
from server.jobs import JobManager

# Child processes, a Ray cluster or a real model: in `make test`, not in `make test-fast`.
pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import json, signal, sys, time
    mode = sys.argv[1]
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    print("a library writing to stdout", flush=True)
    for step in range(1, 4):
        print(json.dumps({"event": "progress", "step": step, "total": 3, "loss": 1.0 / step}), flush=True)
    if mode == "fail":
        print("noise", file=sys.stderr)
        print("loraplex train: 2 bad line(s) in d.jsonl:", file=sys.stderr)
        print("d.jsonl:3: invalid JSON", file=sys.stderr)
        sys.exit(1)
    if mode == "slow":
        while not stop:
            time.sleep(0.02)
        sys.exit(3)
    print(json.dumps({"event": "done", "path": "/x", "card": {"ok": True}}), flush=True)
""")


def manager(tmp_path, **kw):
    finished = []
    m = JobManager(tmp_path / "logs", program=[sys.executable, "-c", SCRIPT], stop_timeout=5,
                   on_finish=lambda kind, status: finished.append((kind, status)), **kw)
    m.finished = finished
    return m


async def until(job, *statuses, timeout=30.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while job.status not in statuses:
        assert asyncio.get_running_loop().time() < deadline, job.public()
        await asyncio.sleep(0.02)


async def until_step(job, timeout=30.0):
    """Until the child reported progress (its SIGTERM handler is installed by then)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while job.progress.get("step") != 3:
        assert asyncio.get_running_loop().time() < deadline, job.public()
        await asyncio.sleep(0.02)


def test_progress_result_and_success_hook(tmp_path):
    async def main():
        m = manager(tmp_path)
        seen = []

        async def hook(job):
            seen.append(job.result["path"])
            return {"registered": True}
        job = m.submit("train", ["ok"], {"name": "a"}, hook)
        assert job.public()["status"] == "queued"
        await until(job, "succeeded", "failed")
        assert job.status == "succeeded", job.error
        assert job.progress["step"] == 3 and job.progress["loss"] == pytest.approx(1 / 3)
        assert job.result == {"path": "/x", "card": {"ok": True}, "registered": True}
        assert seen == ["/x"] and m.finished == [("train", "succeeded")]
        assert m.get(job.id) is job
        with pytest.raises(NotFound):
            m.get("nope")
    asyncio.run(main())


def test_failure_reports_the_commands_own_message(tmp_path):
    async def main():
        m = manager(tmp_path)
        job = m.submit("train", ["fail"], {})
        await until(job, "succeeded", "failed")
        assert job.status == "failed"
        assert job.error.startswith("exit status 1: loraplex train: 2 bad line(s)")
        assert "d.jsonl:3: invalid JSON" in job.error and "noise" not in job.error
    asyncio.run(main())


def test_failing_hook_fails_the_job(tmp_path):
    async def main():
        m = manager(tmp_path)

        async def hook(job):
            raise Conflict("name taken")
        job = m.submit("train", ["ok"], {}, hook)
        await until(job, "succeeded", "failed")
        assert job.status == "failed" and "name taken" in job.error
    asyncio.run(main())


def test_queue_bound_cancel_and_one_at_a_time(tmp_path):
    async def main():
        m = manager(tmp_path, max_queued=2)
        running = m.submit("train", ["slow"], {"name": "r"})
        await until_step(running)
        waiting = [m.submit("train", ["ok"], {"name": f"w{i}"}) for i in range(2)]
        with pytest.raises(Overloaded) as e:
            m.submit("train", ["ok"], {})
        assert e.value.retry_after > 0
        assert m.count("running") == 1 and m.count("queued") == 2
        assert m.active("train", "name", "w1") is waiting[1]
        await m.cancel(waiting[0].id)
        assert waiting[0].status == "cancelled"
        await m.cancel(running.id)  # SIGTERM: the child stops at a safe point (exit 3)
        await until(running, "cancelled", "failed")
        assert running.status == "cancelled" and "checkpoint" in running.error
        await until(waiting[1], "succeeded", "failed")
        assert waiting[1].status == "succeeded"
    asyncio.run(main())


def test_shutdown_stops_the_running_job_and_cancels_the_queue(tmp_path):
    async def main():
        m = manager(tmp_path)
        running = m.submit("export", ["slow"], {})
        queued = m.submit("export", ["ok"], {})
        await until_step(running)
        await m.shutdown()
        assert queued.status == "cancelled"
        await until(running, "cancelled")
    asyncio.run(main())


def test_a_job_child_dies_with_its_server(tmp_path):
    """kill -9 of the parent reaches the child as SIGTERM (PR_SET_PDEATHSIG armed by the child itself)."""
    import os
    import signal
    import subprocess
    import time

    pidfile = tmp_path / "child.pid"
    child = ("import os, time; from server.jobs import stop_with_parent; stop_with_parent(); "
             f"open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    parent = ("import os, subprocess, sys, time; "
              "env = {**os.environ, 'LORAPLEX_JOB_PARENT_PID': str(os.getpid())}; "
              f"subprocess.Popen([sys.executable, '-c', {child!r}], env=env); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", parent])
    deadline = time.monotonic() + 30
    while not (pidfile.exists() and pidfile.read_text()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child_pid = int(pidfile.read_text())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            return
        try:  # reaped by init eventually; a zombie still answers kill(0)
            if open(f"/proc/{child_pid}/stat").read().split()[2] == "Z":
                return
        except OSError:
            return
        time.sleep(0.05)
    raise AssertionError("the child outlived its parent")
