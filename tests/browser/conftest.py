"""A real Chromium (Debian's package, driven by Playwright) against real server processes.

One browser per test module; each test gets a fresh context (so a fresh session storage),
fails on any console error or uncaught exception, and leaves one screenshot in its tmp dir.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DEMO_MODELS, ServerProcess, start_server

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        message = "Debian's chromium is not installed (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as playwright:
        # launch() gives the browser a fresh temporary user-data directory of its own.
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


class PageProblems:
    """Console errors and uncaught exceptions seen by one page."""

    def __init__(self, page) -> None:
        self.messages: list[str] = []
        page.on("console", lambda m: self.messages.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda exc: self.messages.append(f"uncaught: {exc}"))


@pytest.fixture
def open_page(browser, tmp_path: Path):
    """``open_page(server, api_key=None)`` -> a page showing the playground of ``server``."""
    contexts = []
    pages: list[tuple[object, PageProblems]] = []

    def factory(server: ServerProcess, api_key: str | None = None):
        context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        if api_key is not None:
            context.add_init_script(f"sessionStorage.setItem('rnnserve.apiKey', {json.dumps(api_key)});")
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(10_000)
        problems = PageProblems(page)
        pages.append((page, problems))
        page.goto(server.url + "/")
        return page

    yield factory
    try:
        if pages:
            pages[-1][0].screenshot(path=str(tmp_path / "playground.png"), full_page=True)
        problems = [m for _, p in pages for m in p.messages]
        assert not problems, f"JavaScript console errors: {problems}"
    finally:
        for context in contexts:
            context.close()


def broken_model(repo: Path) -> None:
    """A version whose ONNX file is not a model: listed with its load error."""
    folder = repo / "broken-gru" / "1"
    folder.mkdir(parents=True)
    card = json.loads((DEMO_MODELS / "reber-gru" / "1" / "card.json").read_text())
    card.update(name="broken-gru", version=1)
    card.pop("sha256", None)
    (folder / "card.json").write_text(json.dumps(card))
    (folder / "model.onnx").write_bytes(b"this is not an onnx model")


@pytest.fixture(scope="module")
def demo_repo(tmp_path_factory: pytest.TempPathFactory, token_repo: Path) -> Path:
    """The demo models, the tiny token-input models and one broken model."""
    repo = tmp_path_factory.mktemp("playground-repo")
    for source in (DEMO_MODELS, token_repo):
        for model in source.iterdir():
            if (model / "1" / "card.json").exists():
                shutil.copytree(model, repo / model.name, ignore=shutil.ignore_patterns("*.png", "history.json"))
    broken_model(repo)
    second = repo / "sine-lstm" / "2"  # a second version: the new default
    shutil.copytree(repo / "sine-lstm" / "1", second)
    card = json.loads((second / "card.json").read_text())
    (second / "card.json").write_text(json.dumps({**card, "version": 2}))
    return repo


@pytest.fixture(scope="module")
def reber_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Only the reber demo: quick to load, for the tests that start their own servers."""
    repo = tmp_path_factory.mktemp("reber-repo")
    shutil.copytree(DEMO_MODELS / "reber-gru", repo / "reber-gru", ignore=shutil.ignore_patterns("*.png", "history.json"))
    return repo


@pytest.fixture(scope="module")
def demo_server(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = start_server(demo_repo, tmp_path_factory.mktemp("playground-logs"))
    try:
        yield server
    finally:
        server.stop()
