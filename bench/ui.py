"""The web UI (issue 16): time from `ownllm serve` starting to the first streamed token in the page, and the page
weight of the playground (bytes transferred, headers included, for everything it loads before the first chat).

Each run starts a fresh `ownllm serve MODEL` on loopback while headless Chromium (the system's, as in the tests)
is already open, then: server answering /health, the playground loaded (models listed), the first token of a reply
to a fixed prompt shown in the page. `--runs` cold starts; we report the median and the fastest (the least disturbed
by other load).

    python bench/ui.py [--runs 3] [--model smollm2-135m-instruct] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
from serve import free_port  # bench/serve.py, beside this file


def one_run(browser: object, model: str) -> dict[str, float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data_dir = tempfile.mkdtemp(prefix="ownllm-bench-ui-")
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "ownllm", "serve", model, "--port", str(port), "--data-dir",
                               data_dir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError("the server exited")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        ready = time.perf_counter()
        context = browser.new_context()
        page = context.new_page()
        page.set_default_timeout(300_000)
        loaded: list[object] = []
        page.on("requestfinished", lambda request: loaded.append(request))
        page.goto(url + "/#playground")
        page.locator("#model option").first.wait_for(state="attached")
        page.wait_for_load_state("networkidle")
        shown = time.perf_counter()
        weight = 0
        for request in loaded:
            sizes = request.sizes()
            weight += sizes["responseBodySize"] + sizes["responseHeadersSize"]
        files = len(loaded)
        page.fill("#max-tokens", "16")
        page.fill("#prompt", "Write one sentence about the sea.")
        page.click("#send")
        page.locator(".message.assistant .tok").first.wait_for()
        first_token = time.perf_counter()
        page.locator("#send:not([disabled])").wait_for()
        context.close()
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(data_dir, ignore_errors=True)
    return {"server_ready_s": ready - started, "page_ready_s": shown - started,
            "first_token_s": first_token - started, "first_token_after_click_s": first_token - shown,
            "page_kb": weight / 1000, "page_requests": files}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        sys.exit("no system Chromium: apt-get install chromium (make setup does it)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        runs = [one_run(browser, args.model) for _ in range(args.runs)]
        browser.close()
    if args.json:
        print(json.dumps(runs, indent=2))
        return
    print(f"{args.model}, {args.runs} cold starts, {os.cpu_count()} cores (median / fastest)")
    print("| measure | median | fastest |")
    print("|---|---:|---:|")
    for key in runs[0]:
        values = [r[key] for r in runs]
        print(f"| {key} | {statistics.median(values):.2f} | {min(values):.2f} |")


if __name__ == "__main__":
    main()
