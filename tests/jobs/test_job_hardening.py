"""Hostile input to the files and fine-tuning jobs API: a file nobody can read fails its job with the data doctor's
message (never a stuck job), one bad job never holds up the others (not even across a restart), bad
hyper-parameters are a 400 at creation, and odd ids, queries and file names are 4xx in OpenAI's envelope."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ownllm.errors import OwnLLMError
from ownllm.jobs.manager import JobManager
from ownllm.jobs.store import JobStore
from ownllm.jobs.validate import validate_files
from tests.jobs.helpers import small_facts, upload, wait_for
from tests.serve.conftest import Server

FACTS = small_facts()  # 40 replay answers per job, not 200
GOOD = FACTS.read_bytes()
RANDOM_BYTES = random.Random(0).randbytes(4000)
TINY = {"n_epochs": 1, "batch_size": 1, "max_steps": 1}  # one step: a job that trains in seconds


def seed_job(store: JobStore, content: bytes, filename: str, *, model: str = "base",
             hyperparameters: dict[str, Any] | None = None) -> dict[str, Any]:
    """A job in `validating_files` on a new file, written straight into the store (as an older server left it)."""
    staged = store.files_dir / f".{filename}.tmp"
    staged.write_bytes(content)
    file_id = store.add_file(filename, "fine-tune", staged)["id"]
    return store.add_job(model=model, training_file=file_id, validation_file=None, method={"type": "supervised"},
                         hyperparameters=hyperparameters or {}, suffix=None, seed=1)


def assert_envelope(response: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def test_a_cancel_is_final_at_once_and_the_stopping_worker_keeps_its_place(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The reply to a cancel says `cancelled` (as OpenAI's does); the worker is told to stop, and until it has, the
    next job does not start beside it (one running job at a time)."""
    import subprocess
    import sys

    store = JobStore(tmp_path)
    first, second = seed_job(store, GOOD, "a.jsonl"), seed_job(store, GOOD, "b.jsonl")
    manager = JobManager(store, "base", on_model_ready=lambda *_: None)
    # a worker that takes a moment to stop after SIGTERM, as a training step does
    slow_stop = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: (time.sleep(1.5), sys.exit(143)))"
                 "; print('ready', flush=True); time.sleep(60)")
    started: list[str] = []

    def spawn(job: dict[str, Any]) -> None:
        process = subprocess.Popen([sys.executable, "-c", slow_stop], stdout=subprocess.PIPE)
        assert process.stdout is not None and process.stdout.readline() == b"ready\n"
        manager.workers[job["id"]] = process
        started.append(job["id"])

    monkeypatch.setattr(manager, "_spawn", spawn)
    manager.tick()
    assert started == [first["id"]]
    store.set_status(first["id"], "running")
    manager.cancel(first["id"])
    assert store.get_job(first["id"])["status"] == "cancelled"  # type: ignore[index]
    manager.tick()
    assert started == [first["id"]]  # the cancelled job's worker is still stopping
    manager.workers[first["id"]].wait(timeout=30)
    manager.tick()
    assert started == [first["id"], second["id"]]
    assert store.get_job(first["id"])["status"] == "cancelled"  # type: ignore[index]
    manager.workers[second["id"]].kill()


# --- without a server: the data doctor and one manager tick ----------------------------------------------------
@pytest.mark.parametrize(("content", "needle"), [
    (b"not json at all\n", "notes.jsonl line 1: invalid JSON"),
    (RANDOM_BYTES, "notes.jsonl line 1: not UTF-8 text"),
    (b"[" * 100_000 + b"\n", "line 1: invalid JSON (nested too deeply)"),
    (b'{"n": ' + b"1" * 5000 + b"}\n", "line 1: invalid JSON (Exceeds the limit"),
    (b'{"foo": 1}\n{"bar": 2}\n', "line 2: no known format (keys: bar"),
    (GOOD.replace(b"\n", b"\n\xff\xfe\n", 1), "notes.jsonl line 2: not UTF-8 text (byte 0xff at column 1)"),
    (b"\n \n\n", "has no examples"),
])
def test_validation_names_the_problem_of_any_file(tmp_path: Path, content: bytes, needle: str) -> None:
    store = JobStore(tmp_path)
    examples, problem, field = validate_files(store, seed_job(store, content, "notes.jsonl"))
    assert examples == 0 and field == "training_file"
    assert problem is not None and needle in problem and "notes.jsonl" in problem
    assert "file-" not in problem  # the upload's name, not where the server keeps it


def test_one_tick_fails_each_bad_job_and_still_starts_the_good_one(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    store = JobStore(tmp_path)
    not_json = seed_job(store, b"not json at all\n", "notes.jsonl")
    binary = seed_job(store, RANDOM_BYTES, "blob.bin")
    exploding = seed_job(store, GOOD, "a.jsonl")  # validation hits a bug
    cancelled = seed_job(store, GOOD, "b.jsonl")
    unstartable = seed_job(store, GOOD, "c.jsonl")  # its worker cannot start
    good = seed_job(store, GOOD, "d.jsonl")

    from ownllm.jobs import manager as manager_module

    real_validate = manager_module.validate_or_fail

    def validate(store: JobStore, job: dict[str, Any]) -> int | None:
        if job["id"] == exploding["id"]:
            raise RuntimeError("boom")
        return real_validate(store, job)

    started: list[str] = []

    def spawn(job: dict[str, Any]) -> None:
        if job["id"] == unstartable["id"]:
            raise OSError("no more processes")
        started.append(job["id"])

    monkeypatch.setattr(manager_module, "validate_or_fail", validate)
    manager = JobManager(store, "base", on_model_ready=lambda *_: None)  # a fresh manager: a restart
    monkeypatch.setattr(manager, "_spawn", spawn)
    manager.cancel(cancelled["id"])
    manager.tick()

    status = {job: store.get_job(row["id"]) for job, row in (("not_json", not_json), ("binary", binary),
                                                             ("exploding", exploding), ("cancelled", cancelled),
                                                             ("unstartable", unstartable), ("good", good))}
    assert {job: row["status"] for job, row in status.items()} == {  # type: ignore[index]
        "not_json": "failed", "binary": "failed", "exploding": "failed", "cancelled": "cancelled",
        "unstartable": "failed", "good": "queued"}
    assert started == [good["id"]]  # in the same tick, behind all of them
    assert "notes.jsonl line 1: invalid JSON" in json.loads(status["not_json"]["error"])["message"]  # type: ignore[index]
    assert "blob.bin line 1: not UTF-8 text" in json.loads(status["binary"]["error"])["message"]  # type: ignore[index]
    exploded = json.loads(status["exploding"]["error"])  # type: ignore[index]
    assert exploded["code"] == "internal_error" and "validating its files (RuntimeError: boom)" in exploded["message"]
    assert "starting its training process (OSError" in json.loads(status["unstartable"]["error"])["message"]  # type: ignore[index]


# --- against a real server --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(default_model: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server started on a data folder that already holds a job stuck on an unreadable file (what an older
    server left behind), with a good job queued behind it."""
    data_dir = tmp_path_factory.mktemp("hardening-data")
    store = JobStore(data_dir)
    stuck = seed_job(store, b"not json at all\n", "stuck.jsonl", model=default_model)
    behind = seed_job(store, GOOD, "behind.jsonl", model=default_model, hyperparameters=TINY)
    store.close()
    # workers as fresh interpreters, the way where the forkserver cannot start (the other jobs tests fork them)
    running = Server(default_model, "--data-dir", str(data_dir), "--max-batch", "2",
                     env={"OWNLLM_JOB_FORKSERVER": "0"})
    running.data_dir, running.seeded = data_dir, (stuck["id"], behind["id"])  # type: ignore[attr-defined]
    yield running
    running.stop()


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"{server.url}/v1", timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def good_file(server: Server) -> str:
    return upload(server.client(), FACTS)


@pytest.mark.slow
def test_a_stuck_bad_job_fails_on_restart_and_bad_cancelled_good_in_a_row_the_good_one_succeeds(
        server: Server, default_model: str, good_file: str, tmp_path: Path) -> None:
    client = server.client()
    stuck, behind = server.seeded  # type: ignore[attr-defined]
    failed = wait_for(client, stuck, ("failed", "succeeded", "cancelled"), timeout=60)
    assert failed.status == "failed" and "stuck.jsonl line 1: invalid JSON" in failed.error.message

    blob = tmp_path / "blob.jsonl"
    blob.write_bytes(RANDOM_BYTES)
    bad = client.fine_tuning.jobs.create(model=default_model, training_file=upload(client, blob))
    doomed = client.fine_tuning.jobs.create(model=default_model, training_file=good_file, hyperparameters=TINY)
    good = client.fine_tuning.jobs.create(model=default_model, training_file=good_file, hyperparameters=TINY)
    client.fine_tuning.jobs.cancel(doomed.id)

    bad_done = wait_for(client, bad.id, ("failed", "succeeded", "cancelled"), timeout=60)
    assert bad_done.status == "failed" and bad_done.error.code == "invalid_training_file"
    assert "blob.jsonl line 1: not UTF-8 text" in bad_done.error.message
    for job_id in (behind, good.id):
        done = wait_for(client, job_id, ("succeeded", "failed", "cancelled"))
        assert done.status == "succeeded", done.error
    assert client.fine_tuning.jobs.retrieve(doomed.id).status == "cancelled"
    assert "tick failed" not in server.log.read_text()


def test_a_bad_forkserver_switch_stops_the_start_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OWNLLM_JOB_FORKSERVER", "maybe")
    with pytest.raises(OwnLLMError, match="OWNLLM_JOB_FORKSERVER='maybe': use 1 or 0"):
        JobManager(JobStore(tmp_path), "base", on_model_ready=lambda name, folder: None)


BAD_HYPERPARAMETERS = [
    ({"hyperparameters": {"n_epochs": -1}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": 1_000_000_000}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": "abc"}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": True}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"n_epochs": 2.5}}, "hyperparameters.n_epochs"),
    ({"hyperparameters": {"learning_rate_multiplier": 0}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"learning_rate_multiplier": -1}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"learning_rate_multiplier": 1e9}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"learning_rate_multiplier": "NaN"}}, "hyperparameters.learning_rate_multiplier"),
    ({"hyperparameters": {"batch_size": 0}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"batch_size": 257}}, "hyperparameters.batch_size"),
    ({"hyperparameters": {"max_steps": 10**12}}, "hyperparameters.max_steps"),
    ({"hyperparameters": {"n_epoch": 3}}, "hyperparameters.n_epoch"),
    ({"hyperparameters": {"beta": 0.1}}, "hyperparameters.beta"),  # DPO's, not supervised
    ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}},
     "method.supervised.hyperparameters.n_epochs"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}}, "method.dpo.hyperparameters.beta"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 100}}}}, "method.dpo.hyperparameters.beta"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": False}}}},
     "method.dpo.hyperparameters.batch_size"),
    ({"method": {"type": "dpo", "supervised": {"hyperparameters": {}}}}, "method.supervised"),
    ({"method": {"type": "unsupervised"}}, "method.type"),
    ({"method": {"type": "reinforcement"}}, "method.reinforcement.grader"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"seed": True}, "seed"),
    ({"seed": "7"}, "seed"),
    ({"suffix": "x" * 65}, "suffix"),
    ({"suffix": "a:b/c"}, "suffix"),
    ({"hyperparameters": ["n_epochs", 3]}, "hyperparameters"),
    ({"validation_file": 12}, "validation_file"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("extra", "param"), BAD_HYPERPARAMETERS,
                         ids=[f"{p}={json.dumps(e)[:60]}" for e, p in BAD_HYPERPARAMETERS])
def test_a_bad_create_body_is_a_400_naming_the_field(http: httpx.Client, default_model: str, good_file: str,
                                                     extra: dict[str, Any], param: str) -> None:
    before = len(http.get("/fine_tuning/jobs", params={"limit": 100}).json()["data"])
    body = {"model": default_model, "training_file": good_file, **extra}
    response = http.post("/fine_tuning/jobs", json=body)
    error = assert_envelope(response, 400, param)
    assert error["type"] == "invalid_request_error"
    assert len(http.get("/fine_tuning/jobs", params={"limit": 100}).json()["data"]) == before  # no job made


@pytest.mark.slow
@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_nan_and_infinity_are_not_numbers_here(http: httpx.Client, default_model: str, good_file: str,
                                              number: bytes) -> None:
    body = b'{"model": "%s", "training_file": "%s", "hyperparameters": {"learning_rate_multiplier": %s}}' % (
        default_model.encode(), good_file.encode(), number)
    response = http.post("/fine_tuning/jobs", content=body, headers={"content-type": "application/json"})
    assert_envelope(response, 400, "hyperparameters.learning_rate_multiplier")


@pytest.mark.slow
def test_good_hyperparameters_are_kept(http: httpx.Client, default_model: str, good_file: str) -> None:
    """Every accepted shape (auto, null, the bounds, an int learning rate) makes a job; cancelled at once."""
    body = {"model": default_model, "training_file": good_file, "suffix": "edge-1.0_x", "seed": 2**31 - 1,
            "hyperparameters": {"n_epochs": 50, "batch_size": "auto", "learning_rate_multiplier": 10},
            "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 256,
                                                                                "max_steps": None}}},
            "metadata": {"team": "a"}, "integrations": []}
    response = http.post("/fine_tuning/jobs", json=body)
    assert response.status_code == 200, response.text
    job = response.json()
    http.post(f"/fine_tuning/jobs/{job['id']}/cancel")
    assert job["seed"] == 2**31 - 1 and job["user_provided_suffix"] == "edge-1.0_x"
    assert job["method"]["supervised"]["hyperparameters"]["batch_size"] == 256


@pytest.mark.slow
def test_files_and_jobs_routes_answer_hostile_input_with_4xx(server: Server, http: httpx.Client,
                                                             default_model: str) -> None:
    for path, params in [("/files", {"limit": 10**30}), ("/files", {"limit": -1}), ("/files", {"limit": "abc"}),
                         ("/files", {"order": "sideways"}), ("/fine_tuning/jobs", {"limit": 10**30}),
                         ("/fine_tuning/jobs", {"limit": 0}), ("/fine_tuning/jobs/ftjob-nope/events", {"limit": -5})]:
        assert 400 <= http.get(path, params=params).status_code < 500, (path, params)
    for path in ("/files?after=%00garbage", "/files?purpose=%FF", "/fine_tuning/jobs?after=zzz"):
        assert http.get(path).status_code == 200, path  # an unknown cursor or filter just matches nothing new
    for method, path in [("DELETE", "/files/file-nope"), ("DELETE", "/files/%F0%9F%98%80"),
                         ("GET", "/files/nope/content"), ("POST", "/fine_tuning/jobs/ftjob-nope/cancel"),
                         ("POST", "/fine_tuning/jobs/%00/cancel"), ("GET", "/fine_tuning/jobs/x/checkpoints"),
                         ("GET", "/fine_tuning/jobs/x/events"), ("DELETE", "/files/..%2F..%2Fjobs.db")]:
        assert_envelope(http.request(method, path), 404)
    for purpose in ("fine-tune-results", "bogus", ""):
        assert_envelope(http.post("/files", files={"file": ("a.jsonl", GOOD)}, data={"purpose": purpose}), 400,
                        "purpose")
    assert_envelope(http.post("/files", data={"purpose": "fine-tune"}), 400, "file")
    for body in (b"[]", b"null", b'"x"', b"{", b'{"model": 1, "training_file": "f"}'):
        assert_envelope(http.post("/fine_tuning/jobs", content=body, headers={"content-type": "application/json"}),
                        400)

    # odd file names are kept as given, and the content still downloads
    raw = (b'--B\r\nContent-Disposition: form-data; name="file"; filename="\xff\xfe\x00odd.jsonl"\r\n\r\n{}\r\n'
           b'--B\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n--B--\r\n')
    uploads = [http.post("/files", files={"file": (name, b"{}\n")}, data={"purpose": "fine-tune"})
               for name in ('ünï "quoted"\r\n;x=1.jsonl', "../../etc/passwd")]
    uploads.append(http.post("/files", content=raw, headers={"content-type": "multipart/form-data; boundary=B"}))
    for response in uploads:
        assert response.status_code == 200, response.text
        file_id = response.json()["id"]
        assert http.get(f"/files/{file_id}").json()["filename"] == response.json()["filename"]
        content = http.get(f"/files/{file_id}/content")
        assert content.status_code == 200 and content.content.strip() == b"{}"
    # bytes gone from the data folder behind the server's back: 404, and a job on it fails with a message
    gone = uploads[0].json()["id"]
    (server.data_dir / "files" / gone).unlink()  # type: ignore[attr-defined]
    assert_envelope(http.get(f"/files/{gone}/content"), 404, "id")
    job = server.client().fine_tuning.jobs.create(model=default_model, training_file=gone)
    failed = wait_for(server.client(), job.id, ("failed", "succeeded", "cancelled"), timeout=60)
    assert failed.status == "failed" and "missing from the server's data folder" in failed.error.message
    assert "Traceback" not in server.log.read_text()



def test_a_job_replays_against_forgetting_and_its_checkpoints_count_the_replay_rows(tmp_path: Path) -> None:
    from ownllm.jobs.worker import config_for

    store = JobStore(tmp_path)
    job = {"method": json.dumps({"type": "supervised"}), "hyperparameters": json.dumps({}), "training_file": "f",
           "validation_file": None, "id": "ftjob-x", "seed": 1}
    cfg = config_for(store, job, "smollm2-135m-instruct", examples=10)  # auto: 10 epochs, batch 1
    assert cfg.replaying and cfg.replay_loss == "kl"
    # 10 examples + 25 replay rows (2.5 per example) a step each, 10 epochs, about four checkpoints
    assert cfg.save_every == cfg.eval_every == 88
    dpo = config_for(store, {**job, "method": json.dumps({"type": "dpo"})}, "smollm2-135m-instruct", examples=10)
    assert not dpo.replaying and dpo.save_every == 25
