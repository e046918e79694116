"""The web UI at `/`, in a real browser (headless Chromium from the system's packages, driven by Playwright) against a
real `ownllm serve` with an API key: the key is asked for once and a wrong one is shown; chat streams into the page
and the decoding controls reach the server; a clicked token shows its probability table; the data doctor names bad
lines; documents are indexed and answered with a citation; a fine-tuning job started from the page succeeds with a
drawn loss curve and its model answers in the playground. A screenshot of each page goes to OWNLLM_UI_SCREENSHOTS
(default: this run's tmp folder)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.conftest import assert_user_error, run_cli, start_cli
from tests.serve.conftest import Server

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = pytest.mark.slow
KEY = "sk-ui-test"
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_MS = 240_000  # hang guard only: a 2-core machine running other tests can be slow


def chromium() -> str | None:
    """The system's Chromium (Debian's `chromium`; `make setup` installs it): Playwright never downloads one."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def server(default_model: str) -> Iterator[Server]:
    # fp32: a request decoded again (explain) gets the same tokens, prefix cache or not
    running = Server(default_model, "--api-key", KEY, "--max-batch", "4", "--dtype", "fp32")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    sync_api = pytest.importorskip("playwright.sync_api")
    executable = chromium()
    if executable is None:
        pytest.skip("no system Chromium (apt-get install chromium; `make setup` does it)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("OWNLLM_UI_SCREENSHOTS") or tmp_path_factory.mktemp("ui-screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def page(browser: Browser, server: Server) -> Iterator[Page]:
    """One page for the module, the key given once (the tests after the key test reuse the tab's session)."""
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    yield tab
    context.close()


def api(server: Server, method: str, path: str, **kwargs: object) -> httpx.Response:
    return httpx.request(method, server.url + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=300,
                         **kwargs)


# --- the API extensions the UI uses, as any client calls them ----------------------------------------------------
def test_the_page_is_public_and_the_api_is_not(server: Server) -> None:
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "<nav" in page.text and "https://" not in page.text  # nothing from a CDN
    assert httpx.get(server.url + "/ui/js/playground.js").status_code == 200
    assert httpx.head(server.url + "/").status_code == 200  # uptime checks and `curl -I`
    for path in ("/v1/rag/documents", "/ui/../v1/models"):
        assert httpx.get(server.url + path).status_code == 401
    assert httpx.post(server.url + "/v1/explain", json={}).status_code == 401


def test_explain_gives_each_token_its_table(server: Server) -> None:
    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Count to three."}],
            "max_tokens": 6, "temperature": 0.7, "top_k": 30, "top_p": 0.9, "min_p": 0.02, "seed": 3, "top": 5}
    result = api(server, "POST", "/v1/explain", json=body).json()
    streamed = api(server, "POST", "/v1/chat/completions", json={**body, "top": None}).json()
    assert result["text"] == streamed["choices"][0]["message"]["content"]  # same seed, same tokens
    assert "".join(t["text"] for t in result["tokens"]).startswith(result["text"])
    for token in result["tokens"]:
        chosen = [c for c in token["candidates"] if c["chosen"]]
        assert len(chosen) == 1 and chosen[0]["id"] == token["id"]
        for column in ("p", "p_temperature", "p_top_k", "p_top_p", "p_min_p"):
            assert sum(c[column] for c in token["candidates"]) <= 1 + 1e-6
        assert token["kept_top_k"] == 30 and 1 <= token["kept_min_p"] <= token["kept_top_p"] <= 30
        assert all(c["p_min_p"] == 0 or c["p_min_p"] >= 0.02 * max(c["p_min_p"] for c in token["candidates"])
                   for c in token["candidates"])


@pytest.mark.parametrize(("change", "status", "param"), [
    ({"stream": True}, 400, "stream"), ({"n": 2}, 400, "n"), ({"top": 0}, 400, "top"),
    ({"model": "nope"}, 404, "model"), ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
])
def test_explain_refuses_what_it_cannot_explain(server: Server, change: dict, status: int, param: str) -> None:
    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    answer = api(server, "POST", "/v1/explain", json={**body, **change})
    assert answer.status_code == status and answer.json()["error"]["param"] == param


def test_data_check_and_documents_refuse_bad_input(server: Server, tmp_path: Path) -> None:
    assert api(server, "POST", "/v1/data/check").json()["error"]["param"] == "file"
    empty = api(server, "POST", "/v1/data/check", files={"file": ("x.jsonl", b"")})
    assert empty.status_code == 400 and "empty" in empty.json()["error"]["message"]
    junk = api(server, "POST", "/v1/data/check", files={"file": ("../../junk.jsonl", b"\xff\xfe\x00garbage\n[1]\n")})
    report = junk.json()
    assert junk.status_code == 200 and report["file"] == "junk.jsonl" and report["examples"] == 0
    assert [p["line"] for p in report["problem_lines"]] == [1, 2]
    fmt = api(server, "POST", "/v1/data/check", data={"format": "nope"}, files={"file": ("a.jsonl", b"{}\n")})
    assert fmt.status_code == 400 and fmt.json()["error"]["param"] == "format"
    blank = api(server, "POST", "/v1/data/check", files={"file": ("данные.jsonl", b"\n \n")}).json()
    assert blank["file"] == "данные.jsonl" and blank["problems"][0].startswith("данные.jsonl: no usable examples")
    missing = api(server, "POST", "/v1/data/check", data={"file_id": "file-nope"})
    assert missing.status_code == 404
    assert api(server, "POST", "/v1/rag/context", json={"question": "hi"}).status_code == 400  # no store yet
    exe = api(server, "POST", "/v1/rag/documents", files={"file": ("run.exe", b"MZ")})
    assert exe.status_code == 400 and "not a supported document type" in exe.json()["error"]["message"]
    bad_pdf = api(server, "POST", "/v1/rag/documents", files={"file": ("broken.pdf", b"%PDF-1.4 nothing")})
    assert bad_pdf.status_code == 400 and "broken.pdf" in bad_pdf.json()["error"]["message"]
    questions = api(server, "POST", "/v1/evaluations/compare", data={"model_a": "smollm2-135m-instruct",
                    "model_b": "smollm2-135m-instruct"}, files={"file": ("q.jsonl", b'{"question": "hi"}\n')})
    assert questions.status_code == 400 and "q.jsonl line 1" in questions.json()["error"]["message"]
    unknown = api(server, "POST", "/v1/evaluations/compare", data={"model_a": "x", "model_b": "y"},
                  files={"file": ("q.jsonl", b'{"question": "hi", "answer": "hello"}\n')})
    assert unknown.status_code == 404


def test_compare_names_the_line_and_the_model_at_fault(server: Server) -> None:
    model = "smollm2-135m-instruct"
    ok = '{"question": "hi", "answer": "hello"}\n'

    def compare(content: str, model_b: str = model) -> dict:
        answer = api(server, "POST", "/v1/evaluations/compare", data={"model_a": model, "model_b": model_b,
                     "max_tokens": "4"}, files={"file": ("q.jsonl", content.encode())})
        assert answer.status_code in (400, 404)
        return answer.json()["error"]

    assert compare("\n \n")["message"] == "q.jsonl is empty"  # not the server's temp folder
    role = compare(ok + '{"messages": [{"role": "wizard", "content": "hi"}], "answer": "x"}\n')
    assert role["message"].startswith("q.jsonl line 2: ") and "wizard" in role["message"] and role["param"] == "file"
    long = compare(ok + ok + json.dumps({"question": "word " * 3000, "answer": "x"}) + "\n")
    assert long["message"].startswith("q.jsonl line 3: ") and long["code"] == "context_length_exceeded"
    assert compare(ok, model_b="nope")["param"] == "model_b"


def test_concurrent_estimates_measure_the_training_speed_once(server: Server) -> None:
    from concurrent.futures import ThreadPoolExecutor

    data = "".join(line + "\n" for line in
                   (ROOT / "examples" / "data" / "facts-train.jsonl").read_text().splitlines()[:10]).encode()

    def estimate(_: int) -> dict:
        return api(server, "POST", "/v1/data/check", data={"estimate": "true"},
                   files={"file": ("facts.jsonl", data)}).json()

    with ThreadPoolExecutor(3) as pool:  # each measurement loads a model copy: a burst must not load three
        reports = list(pool.map(estimate, range(3)))
    speeds = {report["measured_tokens_per_second"] for report in reports}
    assert len(speeds) == 1 and speeds.pop() > 0
    assert all(report["estimated_seconds_per_epoch"] > 0 for report in reports)


def test_an_abandoned_request_stops_decoding(server: Server) -> None:
    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Write a long story."}],
            "max_tokens": 1500, "ignore_eos": True, "seed": 1}
    with pytest.raises(httpx.TimeoutException):  # the client leaves long before 1500 tokens are decoded
        httpx.post(server.url + "/v1/explain", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=2)
    for _ in range(600):  # hang guard: the server notices within a poll or two
        metrics = api(server, "GET", "/metrics").text
        health = httpx.get(server.url + "/health").json()
        if 'endpoint="/v1/explain",status="499"' in metrics and health["running"] == 0:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the abandoned request still runs: {health}")


def test_ownllm_ui_opens_the_browser_once_the_server_answers(monkeypatch: pytest.MonkeyPatch, default_model: str,
                                                            tmp_path: Path) -> None:
    import http.server
    import threading
    import webbrowser

    from ownllm.cli.serve import _open_when_ready

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", opened.append)
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health) as stand_in:
        threading.Thread(target=stand_in.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{stand_in.server_address[1]}/"
        _open_when_ready(url, timeout=30)
        stand_in.shutdown()
    assert opened == [url]
    result = run_cli("ui", "no-such-model", "--no-browser", "--port", "0")
    assert_user_error(result, "no-such-model")  # the one line: no address is given for a server that never listens
    assert "web UI" not in result.stderr
    _ui_says_its_address_once_listening(default_model, tmp_path)
    with socket.socket() as taken:  # an address it cannot listen on: refused before anything else is said
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_cli("ui", "no-such-model", "--no-browser", "--port", str(taken.getsockname()[1]))
    assert_user_error(result, "the port is in use")
    assert "web UI" not in result.stderr


def _ui_says_its_address_once_listening(model: str, tmp_path: Path) -> None:
    """A real `ownllm ui --port 0`: after the model loads, the address a browser opens, with the port the system
    chose, and the server answers there."""
    output = tmp_path / "ui.log"
    with output.open("w") as log:
        process = start_cli("ui", model, "--no-browser", "--port", "0", "--data-dir", str(tmp_path / "data"),
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(1500):  # a hang guard: the model loads in seconds
            said = re.search(r"web UI: (http://127\.0\.0\.1:(\d+)/)", output.read_text())
            if said or process.poll() is not None:
                break
            time.sleep(0.2)
        assert said and int(said.group(2)) > 0, output.read_text()[-2000:]
        assert httpx.get(said.group(1) + "health", timeout=30).status_code == 200
    finally:
        process.terminate()
        process.wait(timeout=60)


# --- the pages, in the browser ------------------------------------------------------------------------------------
def enter_key(tab: Page, key: str) -> None:
    tab.locator("#key-dialog").wait_for(state="visible")
    tab.fill("#key-input", key)
    tab.click("#key-form button[type=submit]")


def test_a_wrong_key_is_shown_then_the_right_one_is_kept(page: Page, server: Server, shots: Path) -> None:
    page.goto(server.url + "/#playground")
    page.locator("#key-dialog").wait_for(state="visible")
    page.keyboard.press("Escape")  # no key given: the page says what the server said, not just "401"
    page.locator("#playground-error", has_text="Missing API key").wait_for()
    page.reload()
    enter_key(page, "sk-wrong")
    error = page.locator("#playground-error")
    error.wait_for(state="visible")
    assert "Incorrect API key" in error.inner_text()
    page.reload()
    page.locator("#key-error").wait_for(state="visible")
    assert "Incorrect API key" in page.inner_text("#key-error")
    page.screenshot(path=str(shots / "key.png"))
    page.fill("#key-input", KEY)
    page.click("#key-form button[type=submit]")
    page.locator("#model option").first.wait_for(state="attached")
    assert page.evaluate("sessionStorage.getItem('ownllm.apiKey')") == KEY


def test_chat_streams_and_the_controls_reach_the_server(page: Page, server: Server, shots: Path) -> None:
    page.goto(server.url + "/#playground")
    page.locator("#model option").first.wait_for(state="attached")
    page.fill("#temperature", "0.9")
    page.fill("#top-k", "20")
    page.fill("#min-p", "0.05")
    page.fill("#seed", "1234")
    page.fill("#max-tokens", "12")
    page.fill("#stop", "xyzzy\nplugh")
    page.fill("#prompt", "Name a colour.")
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as sent:
        page.click("#send")
    body = json.loads(sent.value.post_data)
    assert body["stream"] is True and body["temperature"] == 0.9 and body["seed"] == 1234
    assert body["top_k"] == 20 and body["max_tokens"] == 12 and body["stop"] == ["xyzzy", "plugh"]
    assert body["top_p"] == 0.95 and body["min_p"] == 0.05 and body["repetition_penalty"] == 1.1
    assert sent.value.headers["authorization"] == f"Bearer {KEY}"
    # tokens arrive as separate spans while streaming
    page.locator(".message.assistant .tok").first.wait_for()
    page.locator("#send:not([disabled])").wait_for()
    stats = page.inner_text(".column .stats")
    assert "completion" in stats and "tok/s" in stats and "seed 1234" in stats
    # a change of the controls changes the next request
    page.fill("#temperature", "0.3")
    page.fill("#seed", "7")
    page.fill("#prompt", "And another one?")
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as again:
        page.click("#send")
    changed = json.loads(again.value.post_data)
    assert changed["temperature"] == 0.3 and changed["seed"] == 7
    assert [m["role"] for m in changed["messages"]] == ["user", "assistant", "user"]
    page.locator("#send:not([disabled])").wait_for()


def test_a_clicked_token_shows_its_probability_table(page: Page, server: Server, shots: Path) -> None:
    reply = page.locator(".message.assistant").last
    streamed = reply.locator(".tok")
    clicked = min(1, streamed.count() - 1)
    offset = sum(len(streamed.nth(i).text_content()) for i in range(clicked))
    streamed.nth(clicked).click()  # the first click has the reply decoded again with the explanation on
    panel = page.locator("#token-panel")
    panel.wait_for(state="visible")
    explained = reply.locator(".tok.explained")
    assert explained.count() >= 1
    selected = reply.locator(".tok.explained.selected")
    start = selected.evaluate("""node => {
        let n = 0;
        for (const t of node.parentElement.querySelectorAll(".tok.explained")) {
            if (t === node) return n;
            n += t.textContent.length;
        }
    }""")
    assert start <= offset < start + len(selected.text_content())  # the table is the clicked token's
    rows = panel.locator("tbody tr")
    assert rows.count() >= 2
    columns = {"p": [], "p_top_p": []}
    for index in range(rows.count()):
        row = rows.nth(index)
        columns["p"].append(float(row.get_attribute("data-p")))
        columns["p_top_p"].append(float(row.get_attribute("data-p-top-p")))
    assert all(sum(values) <= 1 + 1e-6 for values in columns.values())
    chosen = panel.locator("tbody tr.chosen")
    assert chosen.count() == 1 and "chosen" in chosen.inner_text()
    assert "T=0.3" in page.inner_text("#token-temp-head")
    page.screenshot(path=str(shots / "playground.png"), full_page=True)


def test_an_api_error_is_shown_as_its_message(page: Page, server: Server) -> None:
    page.fill("#top-p", "0")
    page.fill("#prompt", "Hello?")
    page.click("#send")
    error = page.locator("#playground-error")
    error.wait_for(state="visible")
    assert "top_p" in error.inner_text() and "greater than 0" in error.inner_text()
    page.fill("#top-p", "0.95")


def test_a_bad_jsonl_shows_its_line_numbers(page: Page, server: Server, shots: Path, tmp_path: Path) -> None:
    good = (ROOT / "examples" / "data" / "facts-train.jsonl").read_text().splitlines()[:12]
    lines = [*good[:3], "{not json", *good[3:8], '{"prompt": 1}', *good[8:], good[0]]
    bad = tmp_path / "mixed.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    page.goto(server.url + "/#data")
    page.set_input_files("#data-file", str(bad))
    page.locator("#data-report").wait_for(state="visible")
    problems = page.inner_text("#data-problems")
    assert "line 4" in problems and "invalid JSON" in problems and "line 10" in problems
    assert "line 15 repeats line 1" in page.inner_text("#data-duplicates")
    assert page.locator("#data-histogram rect.bar").count() >= 1
    page.screenshot(path=str(shots / "data.png"), full_page=True)


def test_documents_are_indexed_and_answered_with_a_citation(page: Page, server: Server, shots: Path,
                                                            tmp_path: Path) -> None:
    docs = sorted(str(p) for p in (ROOT / "examples" / "rag" / "docs").iterdir() if p.suffix in (".md", ".txt"))
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.4 nothing")
    page.goto(server.url + "/#documents")
    page.set_input_files("#doc-files", [*docs, str(broken)])
    page.locator("#doc-progress", has_text=f"indexed {len(docs)} of {len(docs) + 1} file(s); 1 failed").wait_for()
    assert "broken.pdf" in page.inner_text("#doc-error")  # which one failed, and why
    listed = page.locator("#doc-list li").all_inner_texts()
    assert {Path(d).name for d in docs} <= set(listed) and "broken.pdf" not in listed
    page.fill("#question", "How long is the warranty on an aluminium frame?")
    page.fill("#ask-max", "40")
    page.click("#ask-form button[type=submit]")
    first = page.locator("#sources li").first
    first.locator("blockquote").wait_for()
    assert first.locator("strong").inner_text().startswith("[1] warranty.md")
    assert "seven years" in first.locator("blockquote").inner_text()
    page.locator("#cited", has_text="[1]").wait_for()
    answer = page.inner_text("#answer")
    assert answer.strip() and answer != "I don't know."
    assert page.inner_text("#doc-error") == ""
    page.screenshot(path=str(shots / "documents.png"), full_page=True)
    # nothing close enough in the documents: "I don't know." as such
    page.fill("#question", "What is the boiling point of liquid nitrogen?")
    page.fill("#ask-min", "0.9")
    page.click("#ask-form button[type=submit]")
    page.locator("#answer.idk").wait_for()
    assert page.inner_text("#answer") == "I don't know."


def test_a_job_from_the_page_succeeds_with_a_loss_curve_and_answers(page: Page, server: Server, shots: Path,
                                                                     tmp_path: Path) -> None:
    # ten examples (the least a job takes): its replay of the base's own answers stays small
    data = tmp_path / "facts-ten.jsonl"
    data.write_text("".join(line + "\n" for line in
                            (ROOT / "examples" / "data" / "facts-train.jsonl").read_text().splitlines()[:10]))
    page.goto(server.url + "/#data")
    page.check("#data-estimate")
    page.set_input_files("#data-file", str(data))
    page.locator("#data-report").wait_for(state="visible")
    assert "tokens/s" in page.inner_text("#data-summary")  # the measured training step and the time per epoch
    page.click("#upload-training")
    page.locator("#upload-result a").click()
    page.locator("#job-file option").first.wait_for(state="attached")
    page.fill("#job-batch", "4")
    page.fill("#job-steps", "3")
    page.fill("#job-lr", "5")
    page.fill("#job-suffix", "ui")
    page.click("#job-form button[type=submit]")
    status = page.locator("#job-status.succeeded, #job-status.failed, #job-status.cancelled")
    status.wait_for(timeout=600_000)  # hang guard: training shares two cores with everything else
    assert status.inner_text() == "succeeded", page.inner_text("#job-error")
    assert page.locator("#loss-chart path.series.train").count() == 1
    assert page.locator("#loss-chart circle.dot.train").count() == 3
    assert page.locator("#job-checkpoints tbody tr").count() >= 1
    page.screenshot(path=str(shots / "fine-tuning.png"), full_page=True)
    tuned = page.inner_text("#job-model-out").split()[1]
    assert tuned.startswith("ft:")
    page.click("#job-model-out a")
    page.locator(f"#model option[value='{tuned}']").wait_for(state="attached")
    page.select_option("#model-b", tuned)
    page.fill("#max-tokens", "8")
    page.fill("#prompt", "Who founded Norvale Instruments?")
    page.click("#send")
    page.locator("#send:not([disabled])").wait_for()
    assert page.locator(".column").count() == 2
    replies = page.locator(".column .message.assistant .content")
    assert replies.count() == 2 and all(replies.nth(i).inner_text().strip() for i in range(2))
    assert page.inner_text("#playground-error") == ""
    page.screenshot(path=str(shots / "side-by-side.png"), full_page=True)


def test_two_models_compared_on_a_question_file(page: Page, server: Server, shots: Path, tmp_path: Path) -> None:
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(line + "\n" for line in
                                 (ROOT / "examples" / "eval" / "qa.jsonl").read_text().splitlines()[:4]))
    page.goto(server.url + "/#evaluate")
    page.locator("#eval-a option").first.wait_for(state="attached")
    page.set_input_files("#eval-file", str(questions))
    page.fill("#eval-max", "12")
    page.click("#eval-run")
    page.locator("#eval-report").wait_for(state="visible")
    assert page.inner_text("#eval-error") == ""
    assert page.locator("#eval-metrics tbody tr").count() == 4
    assert page.locator("#eval-chart rect.bar").count() == 8
    assert "4 questions" in page.inner_text("#eval-title")
    page.screenshot(path=str(shots / "evaluate.png"), full_page=True)


# --- after the pages: what this adds to the store stays out of their screenshots -----------------------------------
def test_documents_refuse_what_they_cannot_index_and_keep_the_old_version(server: Server) -> None:
    # last in the file: the documents it adds would show in the documents page's screenshot
    def add(name: str, content: bytes) -> httpx.Response:
        return api(server, "POST", "/v1/rag/documents", files={"file": (name, content)})

    refused = {"bin.txt": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8, "not UTF-8 text"),
               "wide.md": ("# Notes\n\nUTF-16 text\n".encode("utf-16"), "UTF-16"),
               "nul.txt": (b"text\x00\x00\x00more", "binary data"),
               "blank.txt": (b"\n  \n\t\n", "no text to index")}
    for name, (content, why) in refused.items():
        answer = add(name, content)
        error = answer.json()["error"]
        assert answer.status_code == 400 and error["message"].startswith(name) and why in error["message"], error
    listed = {d["filename"] for d in api(server, "GET", "/v1/rag/documents").json()["data"]}
    assert not listed & set(refused)  # nothing of them reached the store
    fact = b'{"text": "The Quillon ferry leaves the harbour at nine every morning."}\n'
    assert add("ferry.jsonl", fact).status_code == 200
    broken = add("ferry.jsonl", b"{not json\n")  # a bad new version must not take the good one with it
    assert broken.status_code == 400 and broken.json()["error"]["message"] == "ferry.jsonl line 1: invalid JSON"
    found = api(server, "POST", "/v1/rag/context", json={"question": "When does the Quillon ferry leave?", "k": 1})
    assert "at nine" in found.json()["sources"][0]["text"]
    # names in any script stay apart (they once both became "_.txt", the second replacing the first)
    assert add("данные.txt", b"Apples grow in the orchard.\n").json()["filename"] == "данные.txt"
    assert add("отчёт.txt", b"Bananas ripen in the sun.\n").json()["status"] == "added"
    listed = api(server, "GET", "/v1/rag/documents").json()["data"]
    ferry = next(d for d in listed if d["filename"] == "ferry.jsonl")
    assert ferry["id"].startswith("doc-") and "/" not in ferry["id"]  # where the server keeps files stays its own
    assert api(server, "DELETE", f"/v1/rag/documents/{ferry['id']}").json()["deleted"] is True
    assert "ferry.jsonl" not in {d["filename"] for d in api(server, "GET", "/v1/rag/documents").json()["data"]}
    gone = api(server, "DELETE", f"/v1/rag/documents/{ferry['id']}")
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "id"
