"""The playground page in a real Chromium against real server processes.

Numbers shown by the page are compared with onnxruntime run directly on the model files.
"""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest
from playwright.sync_api import expect

from tests.conftest import DEMO_MODELS, Reference, start_server

REBER = "reber-gru"
SINE = "sine-lstm"
CHARS = "python-chars"
RECS = "session-recs"
TOL = 1e-5


@pytest.fixture(scope="module")
def reber() -> Reference:
    return Reference(DEMO_MODELS / REBER / "1")


def one_hot(reference: Reference, text: str) -> np.ndarray:
    vocabulary = reference.card["vocabulary"]
    x = np.zeros((len(text), len(vocabulary)), np.float32)
    for t, symbol in enumerate(text):
        x[t, vocabulary.index(symbol)] = 1.0
    return x


def shown_candidates(page, step: int) -> list[tuple[str, float]]:
    keys = page.get_by_test_id("next-keys")
    expect(keys).to_have_attribute("data-step", str(step))
    return [
        (item.get_attribute("data-symbol"), float(item.get_attribute("data-probability")))
        for item in keys.locator("li").all()
    ]


def assert_top5(reference: Reference, prefix: str, shown: list[tuple[str, float]]) -> None:
    y, _ = reference.run(one_hot(reference, prefix))
    assert_shown(y[-1], reference.card["vocabulary"], shown, prefix)


def assert_shown(row: np.ndarray, names: list[str], shown: list[tuple[str, float]], prefix) -> None:
    """The page shows the five most probable symbols of ``row``, best first, with their
    probabilities."""
    probabilities = row.astype(np.float64)
    order = sorted(range(len(names)), key=lambda i: (-probabilities[i], i))[:5]
    assert [s for s, _ in shown] == [names[i] for i in order], prefix
    for symbol, p in shown:
        assert abs(p - probabilities[names.index(symbol)]) <= TOL, (prefix, symbol)


def token_outputs(folder, ids: list[int]) -> np.ndarray:
    """onnxruntime on int64 ids [1, T] from the zero state: the last step's output row."""
    reference = Reference(folder)
    feed = {name: state for name, state in reference.zero_states().items()}
    feed["x"] = np.asarray([ids], np.int64)
    feed["lengths"] = np.array([len(ids)], np.int32)
    return reference.session.run(["y"], feed)[0][0, -1]


def open_model(page, name: str, version: int = 1) -> str:
    """Clicks a model's entry (which opens its default version)."""
    page.get_by_test_id(f"model-{name}").click()
    expect(page.get_by_test_id("session-model")).to_have_text(f"{name} v{version}")
    session_id = page.get_by_test_id("session-id")
    expect(session_id).not_to_have_text("—")
    return session_id.inner_text()


def test_model_list_shows_every_loaded_model(demo_server, open_page):
    page = open_page(demo_server)
    listed = httpx.get(f"{demo_server.url}/v1/models").json()["models"]
    demo = {m.name for m in DEMO_MODELS.iterdir() if (m / "1" / "card.json").exists()}
    assert {REBER, SINE, CHARS, RECS} <= demo
    assert {m["name"] for m in listed} == demo | {"tiny-chars", "tiny-items", "broken-gru"}
    assert [v["version"] for v in next(m for m in listed if m["name"] == SINE)["versions"]] == [1, 2]
    models = page.get_by_test_id("model-list")
    expect(models.locator(":scope > li")).to_have_count(len(listed))
    for model in listed:
        entry = page.get_by_test_id(f"model-{model['name']}")
        expect(entry).to_be_visible()
        for version in model["versions"]:
            label = f"v{version['version']}" + (" (default)" if version["version"] == model["default_version"] else "")
            if version["ready"]:
                expect(entry.get_by_test_id(f"model-{model['name']}-v{version['version']}")).to_contain_text(label)
        version = model["versions"][0]
        if version["ready"]:
            card = version["card"]
            facts = [card["cell"], f"{card['input_size']} in", f"{card['output_size']} out"]
            facts += [card[k] for k in ("task",) if k in card] + list(card.get("metrics", {}))[:1]
            facts += [f"{layer['cell']} {layer['hidden_size']}" for layer in card.get("layers") or []]
            for fact in facts:
                expect(entry).to_contain_text(fact)
        else:
            expect(entry).to_contain_text("failed to load")
            expect(entry.locator(".model-error")).to_have_text(version["error"])


def test_typing_steps_the_session_once_per_key(demo_server, open_page, reber, tmp_path):
    page = open_page(demo_server)
    session_id = open_model(page, REBER)
    box = page.get_by_test_id("type-input")
    text = ""
    for key in "BtSX":  # a lower-case key is taken as its symbol
        box.press(key)
        text += key.upper()
        expect(page.get_by_test_id("step-count")).to_have_text(str(len(text)))
        assert_top5(reber, text, shown_candidates(page, len(text)))
    expect(box).to_have_value(text)
    expect(page.get_by_test_id("session-expiry")).to_contain_text("(in 18")  # the 1800 s TTL

    # A symbol outside the vocabulary: the server's error, the key dropped, nothing stepped.
    box.press("Z")
    expect(page.get_by_test_id("error")).to_have_attribute("data-code", "invalid_input")
    expect(page.get_by_test_id("error")).to_contain_text("unknown symbol")
    expect(box).to_have_value(text)
    assert page.get_by_test_id("step-count").inner_text() == str(len(text))

    # The server's state is the reference's state for the typed text...
    _, finals = reber.run(one_hot(reber, text))
    export = httpx.get(f"{demo_server.url}/v1/sessions/{session_id}/state").json()
    assert export["step_count"] == len(text)
    np.testing.assert_allclose(np.asarray(export["state"]["h0"])[:, None, :], finals["h0"], atol=TOL)
    # ... and the export button saves the same as a JSON file.
    with page.expect_download() as download:
        page.get_by_test_id("export-state").click()
    saved = tmp_path / "export.json"
    download.value.save_as(saved)
    exported = json.loads(saved.read_text())
    assert exported["session_id"] == session_id and exported["step_count"] == len(text)
    np.testing.assert_allclose(np.asarray(exported["state"]["h0"])[:, None, :], finals["h0"], atol=TOL)

    # An edit before the end: the session restarts and is fed the remaining text.
    box.press("Backspace")
    expect(page.get_by_test_id("step-count")).to_have_text(str(len(text) - 1))
    assert_top5(reber, text[:-1], shown_candidates(page, len(text) - 1))

    page.get_by_test_id("reset").click()
    expect(page.get_by_test_id("step-count")).to_have_text("0")
    expect(box).to_have_value("")
    expect(page.get_by_test_id("next-keys").locator("li")).to_have_count(0)


def test_generate_continues_the_text(demo_server, open_page, reber):
    page = open_page(demo_server)
    open_model(page, REBER)
    box = page.get_by_test_id("type-input")
    box.press("B")
    box.press("T")
    expect(page.get_by_test_id("step-count")).to_have_text("2")
    page.get_by_test_id("generate-temperature").fill("0")
    page.get_by_test_id("generate-steps").fill("12")
    page.get_by_test_id("generate").click()
    expect(box).not_to_have_value("BT")
    text = box.input_value()
    expect(page.get_by_test_id("step-count")).to_have_text(str(len(text)))
    assert text.startswith("BT") and 2 < len(text) <= 14
    vocabulary = reber.card["vocabulary"]
    for t in range(2, len(text)):  # temperature 0: each symbol is the argmax after its prefix
        y, _ = reber.run(one_hot(reber, text[:t]))
        assert text[t] == vocabulary[int(np.argmax(y[-1]))], (text, t)
    # Typing goes on from the generated text.
    box.press("End")
    box.press("T")
    expect(page.get_by_test_id("step-count")).to_have_text(str(len(text) + 1))
    assert_top5(reber, text + "T", shown_candidates(page, len(text) + 1))


def test_the_next_character_model_types_and_completes(demo_server, open_page):
    folder = DEMO_MODELS / CHARS / "1"
    vocabulary = Reference(folder).card["vocabulary"]
    page = open_page(demo_server)
    open_model(page, CHARS)
    expect(page.get_by_test_id("generate")).to_be_disabled()  # no start symbol: type first
    box = page.get_by_test_id("type-input")
    text = "def f(x):"
    for n, key in enumerate(text, start=1):
        box.press(key)
        expect(page.get_by_test_id("step-count")).to_have_text(str(n))
        row = token_outputs(folder, [vocabulary.index(c) for c in text[:n]])
        assert_shown(row, vocabulary, shown_candidates(page, n), text[:n])
    box.press("Enter")  # a newline is a symbol too
    text += "\n"
    expect(page.get_by_test_id("step-count")).to_have_text(str(len(text)))

    page.get_by_test_id("generate-temperature").fill("0")
    page.get_by_test_id("generate-steps").fill("6")
    page.get_by_test_id("generate").click()
    expect(page.get_by_test_id("step-count")).to_have_text(str(len(text) + 6))
    completed = box.input_value()
    assert completed.startswith(text) and len(completed) == len(text) + 6
    for t in range(len(text), len(completed)):  # temperature 0: each the argmax after its prefix
        row = token_outputs(folder, [vocabulary.index(c) for c in completed[:t]])
        assert completed[t] == vocabulary[int(np.argmax(row))], (completed, t)


def test_token_models_take_ids_or_named_items(demo_server, demo_repo, open_page):
    page = open_page(demo_server)
    # Unnamed items: ids separated by spaces, each one a step once a space follows it.
    open_model(page, "tiny-items")
    expect(page.get_by_test_id("generate")).to_be_disabled()  # no generation in its card
    box = page.get_by_test_id("type-input")
    box.press_sequentially("3 17 4")
    expect(page.get_by_test_id("step-count")).to_have_text("2")
    names = [str(i) for i in range(50)]
    items = demo_repo / "tiny-items" / "1"
    assert_shown(token_outputs(items, [3, 17]), names, shown_candidates(page, 2), "3 17")
    box.press(" ")
    expect(page.get_by_test_id("step-count")).to_have_text("3")
    assert_shown(token_outputs(items, [3, 17, 4]), names, shown_candidates(page, 3), "3 17 4")

    # Named items (the session-recommendation demo): names and ids mix.
    open_model(page, RECS)
    folder = DEMO_MODELS / RECS / "1"
    vocabulary = Reference(folder).card["vocabulary"]
    page.get_by_test_id("type-input").press_sequentially(f"{vocabulary[12]} 7 ")
    expect(page.get_by_test_id("step-count")).to_have_text("2")
    assert_shown(token_outputs(folder, [12, 7]), vocabulary, shown_candidates(page, 2), "12 7")


def chart_points(page) -> dict[str, int]:
    data = page.get_by_test_id("chart").evaluate("c => ({...c.dataset})")
    return {name: int(data[name]) for name in ("inputs", "predictions", "forecast")}


def chart_series(page) -> dict[str, dict[int, float]]:
    """The chart's points, from the table the page keeps inside the canvas."""
    rows = page.get_by_test_id("chart").evaluate(
        "c => [...c.querySelectorAll('tr')].map(r => [r.dataset.series, Number(r.dataset.index), Number(r.dataset.value)])"
    )
    series: dict[str, dict[int, float]] = {"inputs": {}, "predictions": {}, "forecast": {}}
    for name, index, value in rows:
        series[name][index] = value
    return series


def assert_sine_numbers(page) -> None:
    """Predictions and forecasts drawn equal onnxruntime run on the inputs drawn."""
    reference = Reference(DEMO_MODELS / SINE / "1")
    series = chart_series(page)
    n = len(series["inputs"])
    x = np.asarray([series["inputs"][i] for i in range(n)], np.float32)[:, None]
    y, state = reference.run(x)
    np.testing.assert_allclose([series["predictions"][i + 1] for i in range(n)], y[:, 0], atol=TOL)
    last, expected = y[-1], {}
    for index in range(n, n + len(series["forecast"])):  # each forecast fed back as the next input
        expected[index] = float(last[0])
        out, state = reference.run(last[None, :], state)
        last = out[-1]
    assert sorted(series["forecast"]) == sorted(expected)
    np.testing.assert_allclose([series["forecast"][i] for i in sorted(expected)], list(expected.values()), atol=TOL)


def coloured_pixels(page, rgb: tuple[int, int, int]) -> int:
    return page.get_by_test_id("chart").evaluate(
        """(canvas, rgb) => {
            const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
            let n = 0;
            for (let i = 0; i < data.length; i += 4) {
                if (Math.abs(data[i] - rgb[0]) < 8 && Math.abs(data[i + 1] - rgb[1]) < 8
                    && Math.abs(data[i + 2] - rgb[2]) < 8 && data[i + 3] > 200) n++;
            }
            return n;
        }""",
        list(rgb),
    )


def test_streaming_and_forecasting_the_sine(demo_server, open_page):
    page = open_page(demo_server)
    open_model(page, SINE, version=2)
    blue, green = (0x25, 0x63, 0xEB), (0x16, 0xA3, 0x4A)
    legend_only = coloured_pixels(page, blue)
    expect(page.get_by_test_id("forecast")).to_be_disabled()  # nothing to continue from yet
    page.get_by_test_id("stream-start").click()
    page.wait_for_function(
        "() => Number(document.querySelector('[data-testid=step-count]').textContent) >= 12"
    )
    page.get_by_test_id("stream-stop").click()
    expect(page.get_by_test_id("stream-start")).to_be_enabled()
    steps = int(page.get_by_test_id("step-count").inner_text())
    assert steps >= 12
    assert chart_points(page) == {"inputs": steps, "predictions": steps, "forecast": 0}
    assert coloured_pixels(page, blue) > legend_only + 10 * steps  # lines and dots were drawn
    time.sleep(0.2)  # stopped: nothing more is sent
    assert page.get_by_test_id("step-count").inner_text() == str(steps)

    before_forecast = coloured_pixels(page, green)
    page.get_by_test_id("forecast-steps").fill("9")
    page.get_by_test_id("forecast").click()
    expect(page.get_by_test_id("step-count")).to_have_text(str(steps + 9))
    assert chart_points(page) == {"inputs": steps, "predictions": steps, "forecast": 9}
    assert coloured_pixels(page, green) > before_forecast + 50
    page.get_by_test_id("forecast").click()
    expect(page.get_by_test_id("step-count")).to_have_text(str(steps + 18))
    assert chart_points(page)["forecast"] == 18
    assert_sine_numbers(page)
    expect(page.get_by_test_id("error")).to_be_empty()

    # A narrower window: the chart is redrawn at its new size, with every point.
    page.set_viewport_size({"width": 900, "height": 900})
    page.wait_for_function(
        """() => { const c = document.querySelector('[data-testid=chart]');
                   return c.width === Math.round(c.clientWidth * devicePixelRatio) && c.clientWidth < 700; }"""
    )
    assert coloured_pixels(page, blue) > legend_only + 10 * steps


def test_expired_session_shows_its_error_code(reber_repo, server_factory, open_page):
    server = server_factory(reber_repo, RNNSERVE_SESSION_TTL_S="2")  # room for a loaded machine before the first key
    page = open_page(server)
    open_model(page, REBER)
    box = page.get_by_test_id("type-input")
    box.press("B")
    expect(page.get_by_test_id("step-count")).to_have_text("1")
    time.sleep(2.3)
    box.press("T")
    error = page.get_by_test_id("error")
    expect(error).to_have_attribute("data-code", "session_expired")
    expect(error).to_contain_text("session_expired")
    expect(page.get_by_test_id("step-count")).to_have_text("1")
    expect(page.get_by_test_id("session-expiry")).to_contain_text("expired")
    # A new session works again.
    page.get_by_test_id("new-session").click()
    expect(error).to_be_empty()
    expect(page.get_by_test_id("step-count")).to_have_text("0")
    box = page.get_by_test_id("type-input")
    box.press("B")
    expect(page.get_by_test_id("step-count")).to_have_text("1")


def test_the_page_is_public_and_its_calls_carry_the_key(reber_repo, server_factory, open_page):
    server = server_factory(reber_repo, RNNSERVE_API_KEYS="s3cret")
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    page = open_page(server, api_key="s3cret")
    expect(page.get_by_test_id("api-key")).to_have_value("s3cret")
    session_id = open_model(page, REBER)
    page.get_by_test_id("type-input").press("B")
    expect(page.get_by_test_id("step-count")).to_have_text("1")
    info = httpx.get(f"{server.url}/v1/sessions/{session_id}", headers={"X-API-Key": "s3cret"})
    assert info.status_code == 200 and info.json()["step_count"] == 1


def test_typing_resumes_the_session_after_a_server_restart(reber_repo, redis_db, open_page, reber, tmp_path):
    """Sessions in Redis outlive the server process: the page reconnects to the same session
    on the next key and the state carries on, neither repeated nor lost."""
    env = {"RNNSERVE_SESSION_STORE": redis_db(3), "RNNSERVE_LOG_LEVEL": "warning"}
    server = start_server(reber_repo, tmp_path, env)
    try:
        page = open_page(server)
        session_id = open_model(page, REBER)
        box = page.get_by_test_id("type-input")
        for n, key in enumerate("BT", start=1):
            box.press(key)
            expect(page.get_by_test_id("step-count")).to_have_text(str(n))
        server.stop()
        server = start_server(reber_repo, tmp_path, env, port=server.port)
        box.press("S")
        expect(page.get_by_test_id("step-count")).to_have_text("3")
        assert_top5(reber, "BTS", shown_candidates(page, 3))
        expect(page.get_by_test_id("session-id")).to_have_text(session_id)
        expect(page.get_by_test_id("error")).to_be_empty()
    finally:
        server.stop()
