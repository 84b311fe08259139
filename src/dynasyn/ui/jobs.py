"""The UI's background jobs: one at a time, first come first served, each in its own process.

:class:`JobManager` keeps a FIFO queue served by one thread; the thread starts
``python -m dynasyn.ui.worker SPEC`` (:mod:`.worker`) for the next job and waits for it. The
page polls :meth:`JobManager.latest` for a run's job (queued with its position, running,
done, failed with its one-line message, cancelled). Cancel removes a queued job or kills the
running process group; training keeps its checkpoints, so a cancelled or killed run resumes
(``train(…, resume=True)``). A failing job never takes the server down.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynasyn.errors import InputError
from dynasyn.ui.paths import UI_DIR

ACTIVE = ("queued", "running")


@dataclass
class Job:
    """One queued / running / finished job on a run directory."""

    id: int
    kind: str
    run: Path
    params: dict[str, Any]
    state: str = "queued"  # queued, running, done, failed, cancelled
    error: str = ""
    submitted: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def log(self) -> Path:
        """The job process's stdout + stderr."""
        return self.run / UI_DIR / f"job{self.id}-{self.kind}.log"

    @property
    def result(self) -> Path:
        return self.run / UI_DIR / f"job{self.id}-{self.kind}.result.json"

    @property
    def spec(self) -> Path:
        return self.run / UI_DIR / f"job{self.id}-{self.kind}.json"


class JobManager:
    """FIFO queue of jobs, one running at a time (see the module docstring)."""

    def __init__(self, python: str = sys.executable, env: dict[str, str] | None = None):
        self.python = python
        self.env = env
        self.jobs: dict[int, Job] = {}
        self._queue: deque[Job] = deque()
        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._serve, name="dynasyn-ui-jobs", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public
    def submit(self, kind: str, run: str | Path, params: dict[str, Any]) -> Job:
        """Queue a job; refuses a second active job on the same run."""
        run = Path(run)
        with self._cv:
            busy = self.active(run)
            if busy is not None:
                raise InputError(f"run {run.name} already has a {busy.kind} job {busy.state} "
                                 f"(#{busy.id}); wait for it or cancel it")
            job = Job(next(self._ids), kind, run, params)
            self.jobs[job.id] = job
            self._queue.append(job)
            self._cv.notify_all()
        return job

    def active(self, run: str | Path) -> Job | None:
        """The queued or running job of ``run``, if any."""
        run = Path(run)
        return next((j for j in self.jobs.values() if j.run == run and j.state in ACTIVE), None)

    def latest(self, run: str | Path, kinds: tuple[str, ...] | None = None) -> Job | None:
        """The newest job of ``run`` (of one of ``kinds`` when given)."""
        run = Path(run)
        jobs = [j for j in self.jobs.values()
                if j.run == run and (kinds is None or j.kind in kinds)]
        return max(jobs, key=lambda j: j.id) if jobs else None

    def position(self, job: Job) -> int:
        """1 for the next job to start, 2 after it, …; 0 when not queued."""
        with self._cv:
            return next((i + 1 for i, j in enumerate(self._queue) if j is job), 0)

    def running(self) -> Job | None:
        return next((j for j in self.jobs.values() if j.state == "running"), None)

    def cancel(self, job: Job) -> bool:
        """Cancel a queued job, or kill a running one's process group. Returns whether it was
        active."""
        with self._cv:
            if job.state == "queued":
                self._queue.remove(job)
                job.state, job.ended = "cancelled", time.time()
                return True
            if job.state != "running":
                return False
            job.state = "cancelled"
            proc = job.proc
        if proc is not None:
            _kill(proc)
        return True

    def wait(self, job: Job, timeout: float | None = None) -> bool:
        """Block until ``job`` is finished; returns whether it is."""
        end = None if timeout is None else time.time() + timeout
        with self._cv:
            while job.state in ACTIVE:
                left = None if end is None else end - time.time()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def shutdown(self) -> None:
        """Cancel everything and stop the serving thread."""
        with self._cv:
            self._stop = True
            jobs = list(self.jobs.values())
            self._cv.notify_all()
        for j in jobs:
            self.cancel(j)
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ the serving thread
    def _serve(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                job = self._queue.popleft()
                job.state, job.started = "running", time.time()
            try:
                self._run(job)
            except Exception as e:  # noqa: BLE001 - the server keeps serving
                with self._cv:
                    job.state, job.error = "failed", f"{type(e).__name__}: {e}"
            with self._cv:
                job.ended = time.time()
                job.proc = None
                self._cv.notify_all()

    def _run(self, job: Job) -> None:
        job.spec.parent.mkdir(parents=True, exist_ok=True)
        job.result.unlink(missing_ok=True)
        job.spec.write_text(json.dumps({"kind": job.kind, "run": str(job.run),
                                        "params": job.params, "result": str(job.result)}))
        with open(job.log, "w") as log:
            proc = subprocess.Popen([self.python, "-m", "dynasyn.ui.worker", str(job.spec)],
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.env, start_new_session=True)
            with self._cv:
                job.proc = proc
                cancelled = job.state == "cancelled"
            if cancelled:  # cancelled between the pop and the start
                _kill(proc)
            rc = proc.wait()
        with self._cv:
            if job.state == "cancelled":
                return
            try:
                status = json.loads(job.result.read_text())
            except (OSError, ValueError):
                status = {"ok": False, "error": f"the job process ended with status {rc} "
                          f"without a result (killed?); see {job.log}"}
            job.state = "done" if status.get("ok") else "failed"
            job.error = status.get("error", "")


def _kill(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the job's process group, SIGKILL it after ``grace`` seconds."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
