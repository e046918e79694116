"""The server side of fine-tuning jobs: a thread that validates new jobs, starts workers (one at a time by
default), restarts the ones whose worker died (resuming from the last checkpoint), cancels on request, and hands
every succeeded job's adapter to the server so its model id answers at once.

All state is in jobs.db, so a restarted server picks up where the last one stopped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ownllm.finetune.run_folder import final_model_path
from ownllm.jobs.spawn import WorkerProcess, forked_workers, pid_alive, start_worker, warm_forkserver
from ownllm.jobs.store import ACTIVE, JobStore
from ownllm.jobs.validate import validate_or_fail

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3  # worker starts per job before it is failed (crashes, not server restarts, count)
CANCEL_GRACE = 20.0  # seconds a cancelled job's worker has to stop before it is killed


class JobManager:
    """Runs the jobs in `store` on `base` (the served model's spec); `on_model_ready(model_id, adapter_folder)` is
    called once per succeeded job whose model is not deleted, `on_model_removed(model_id)` when one is deleted."""

    def __init__(self, store: JobStore, base: str, *, on_model_ready: Callable[[str, Path], None],
                 on_model_removed: Callable[[str], None] | None = None, max_running: int = 1,
                 threads: int | None = None, poll_seconds: float = 0.5) -> None:
        self.store, self.base = store, base
        self.on_model_ready, self.on_model_removed = on_model_ready, on_model_removed
        self.max_running = max_running
        # training shares the machine with serving: by default it gets half the cores
        self.threads = threads or max(1, (os.cpu_count() or 2) // 2)
        self.poll_seconds = poll_seconds
        self.fork_workers = forked_workers()  # a bad OWNLLM_JOB_FORKSERVER stops the server's start, not a job
        self.workers: dict[str, WorkerProcess] = {}
        self.served: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._publishing = threading.Lock()
        self._stopping_pids: dict[int, float] = {}  # cancelled jobs' workers of an earlier server: pid -> kill time

    # --- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self.publish_models()  # tuned models are back before the first request
        self._thread = threading.Thread(target=self._loop, name="ownllm-jobs", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Server shutdown: workers checkpoint and exit; their jobs stay `running` and resume next start."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            workers = list(self.workers.items())
        for _, process in workers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for job_id, process in workers:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker of %s did not stop in time; killing it", job_id)
                process.kill()
                process.wait()
        with self._lock:
            self._reap()  # a worker that stopped cleanly gives its attempt back, as between ticks

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the loop must survive a bad row or a full disk; the next tick retries
                log.exception("job manager tick failed")
            self._stop.wait(self.poll_seconds)

    # --- one pass ----------------------------------------------------------------------------------
    def tick(self) -> None:
        """Validate new jobs, then start workers. Whatever goes wrong with one job (an unreadable file, a bug, a
        process that cannot start) fails that job and the pass goes on with the others: one bad job must never
        hold up the queue, not even across restarts."""
        # outside the lock: reading a big file takes a while, and cancel() (a request) must not wait for it
        for job in self.store.jobs_with_status("validating_files"):
            if not job["cancel_requested"]:
                self._guarded(job, "validating its files", lambda j: validate_or_fail(self.store, j))
        if self.fork_workers and not self.workers and self.store.jobs_with_status(*ACTIVE):
            warm_forkserver()  # its imports, outside the lock: a cancel meanwhile answers at once
        with self._lock:
            self._reap()
            active = self.store.jobs_with_status(*ACTIVE)
            running = [j for j in active if self._has_worker(j)]
            for pid, kill_at in list(self._stopping_pids.items()):
                if not pid_alive(pid):
                    del self._stopping_pids[pid]
                elif time.monotonic() > kill_at:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(pid, signal.SIGKILL)
            running_ids = {job["id"] for job in running}
            stopping = len(self._stopping_pids) + sum(  # workers of cancelled jobs, not stopped yet
                1 for job_id, process in self.workers.items() if process.poll() is None and job_id not in running_ids)
            for job in active:
                if len(running) + stopping >= self.max_running or self._stop.is_set():
                    break  # a server stopping starts no more workers
                if self._has_worker(job):
                    continue
                if job["cancel_requested"]:
                    self.store.set_status(job["id"], "cancelled", "Job cancelled")
                    continue
                if job["attempts"] >= MAX_ATTEMPTS:
                    message = f"Job failed: the training process stopped unexpectedly {job['attempts']} times"
                    self.store.set_status(job["id"], "failed", message,
                                          error={"code": "worker_died", "message": message, "param": None})
                    continue
                if job["status"] == "validating_files":
                    continue  # cancelled, or its validation failed above and it is failed by now
                if self._guarded(job, "starting its training process", self._spawn):
                    running.append(job)
        self.publish_models()

    def _guarded(self, job: dict[str, Any], doing: str, step: Callable[[dict[str, Any]], Any]) -> bool:
        """Run one job's step; an exception fails that job (with what happened, for its events and `error`)
        instead of the whole pass. False when it failed."""
        try:
            step(job)
            return True
        except Exception as exc:
            log.exception("job %s failed while %s", job["id"], doing)
            message = f"Job failed: internal error while {doing} ({exc.__class__.__name__}: {exc})"
            try:
                self.store.set_status(job["id"], "failed", message,
                                      error={"code": "internal_error", "message": message, "param": None})
            except Exception:  # the store itself is failing (disk full?): the next tick tries again
                log.exception("cannot mark job %s failed", job["id"])
            return False

    def _has_worker(self, job: dict[str, Any]) -> bool:
        process = self.workers.get(job["id"])
        if process is not None and process.poll() is None:
            return True
        # a worker of an earlier server that has not noticed yet: it checkpoints and exits within a second
        return process is None and pid_alive(job["worker_pid"])

    def _spawn(self, job: dict[str, Any]) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "TOKENIZERS_PARALLELISM": "false"}
        process = start_worker([str(self.store.data_dir), job["id"], self.base], env,
                               self.store.runs_dir / f"{job['id']}.log", fork=self.fork_workers)
        self.workers[job["id"]] = process
        self.store.update_job(job["id"], worker_pid=process.pid, attempts=job["attempts"] + 1)

    def _reap(self) -> None:
        """Forget finished workers; one that ended a job by a clean stop (server shutdown) does not count as a
        crash, so its attempt is given back."""
        for job_id, process in list(self.workers.items()):
            code = process.poll()
            if code is None:
                continue
            del self.workers[job_id]
            job = self.store.get_job(job_id)
            if job is not None and job["status"] in ACTIVE and code in (0, 130, 143, -signal.SIGTERM):
                self.store.update_job(job_id, attempts=max(0, job["attempts"] - 1))

    def publish_models(self) -> None:
        """Hand every succeeded job's adapter to the server once. The manager's tick does it, and so does a request
        that looks a model up, so a job reported as succeeded is usable at once, not a tick later."""
        with self._publishing:
            for job in self.store.jobs_with_status("succeeded"):
                name = job["fine_tuned_model"]
                if not name or job["model_deleted"] or name in self.served:
                    continue
                self.served.add(name)
                try:
                    self.on_model_ready(name, final_model_path(self.store.runs_dir / job["id"]))
                except Exception as exc:
                    log.warning("cannot serve %s: %s", name, exc)
                    self.store.add_event(job["id"], f"The model cannot be served by this server: {exc}", level="warn")

    # --- requests ------------------------------------------------------------------------------------
    def cancel(self, job_id: str) -> None:
        """Cancel at once (the reply says `cancelled`, as OpenAI's does) and stop the job's worker: it stops at
        its next step (killed if it has not within the grace time). A stopping worker still holds its place among
        the running ones, so the next job does not start beside it."""
        self.store.update_job(job_id, cancel_requested=1)
        with self._lock:
            process = self.workers.get(job_id)
            job = self.store.get_job(job_id)
            self.store.set_status(job_id, "cancelled", "Job cancelled")
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                threading.Thread(target=self._finish_cancel, args=(job_id, process), daemon=True).start()
            elif job is not None and pid_alive(job["worker_pid"]):  # a worker of an earlier server
                os.kill(job["worker_pid"], signal.SIGTERM)
                self._stopping_pids[job["worker_pid"]] = time.monotonic() + CANCEL_GRACE

    def _finish_cancel(self, job_id: str, process: WorkerProcess, grace: float = CANCEL_GRACE) -> None:
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def delete_model(self, model_id: str) -> bool:
        jobs = [j for j in self.store.jobs_with_status("succeeded") if j["fine_tuned_model"] == model_id]
        if not jobs:
            return False
        with self._publishing:
            for job in jobs:
                self.store.update_job(job["id"], model_deleted=1)
            self.served.discard(model_id)
            if self.on_model_removed:
                self.on_model_removed(model_id)
        return True
