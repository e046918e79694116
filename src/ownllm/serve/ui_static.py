"""The web UI: static files shipped in the package (serve/ui/), served at `/` without a key.

The page holds no data and no secrets; everything it shows comes from the API, behind the key, like any client's."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

UI_DIR = Path(__file__).parent / "ui"


def public_paths() -> set[str]:
    """Paths the API key guard lets through: the page and its assets (a fixed list: nothing else under /ui)."""
    files = {f"/ui/{p.relative_to(UI_DIR).as_posix()}" for p in UI_DIR.rglob("*") if p.is_file()}
    return {"/", *files}


def mount(app: FastAPI) -> None:
    """`/` is the UI's page; `/ui/...` its stylesheet, scripts and icon."""

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)  # HEAD: uptime checks, `curl -I`
    async def index() -> FileResponse:
        # no-cache: a new ownllm version's page is fetched again (the browser revalidates with the ETag)
        return FileResponse(UI_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/ui", StaticFiles(directory=UI_DIR), name="ui")
