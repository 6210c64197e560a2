"""Bad input between good steps: a clear 4xx with ``{"error": {"code", "message"}}``, a stable
code, and the session exactly as it was (the final result equals the reference of the good
steps only)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TOL = 1e-5
MAX_STEPS = 8
MAX_BODY = 2048


def _assert_error(r, status: int, code: str, label: str = "") -> dict:
    assert r.status_code == status, (label, status, code, r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    assert "Traceback" not in r.text
    body = r.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    return error


def _raw(obj_text: str) -> bytes:
    return obj_text.encode()


# (name, raw body, status, code). Bodies are sent verbatim as application/json.
BAD_STEPS = [
    ("wrong feature count", _raw('{"inputs": [[1, 2]]}'), 422, "invalid_input"),
    ("too many features", _raw('{"inputs": [[1, 2, 3, 4]]}'), 422, "invalid_input"),
    ("ragged steps", _raw('{"inputs": [[1, 2, 3], [1, 2]]}'), 422, "invalid_input"),
    ("NaN", _raw('{"inputs": [[NaN, 1, 2]]}'), 422, "invalid_input"),
    ("NaN after good steps", _raw('{"inputs": [[0, 1, 2], [1, NaN, 2]]}'), 422, "invalid_input"),
    ("Infinity", _raw('{"inputs": [[1, -Infinity, 2]]}'), 422, "invalid_input"),
    ("float32 overflow", _raw('{"inputs": [[1e39, 1, 2]]}'), 422, "invalid_input"),
    ("string for a number", _raw('{"inputs": [[1, 2, "3"]]}'), 422, "invalid_input"),
    ("bool for a number", _raw('{"inputs": [[1, true, 3]]}'), 422, "invalid_input"),
    ("null for a number", _raw('{"inputs": [[1, null, 3]]}'), 422, "invalid_input"),
    ("nested too deep", _raw('{"inputs": [[[1], 2, 3]]}'), 422, "invalid_input"),
    ("flat steps for a 3-feature model", _raw('{"inputs": [1, 2, 3]}'), 422, "invalid_input"),
    ("symbols for a numeric model", _raw('{"inputs": ["B", "T"]}'), 422, "invalid_input"),
    ("inputs not a list", _raw('{"inputs": "abc"}'), 422, "invalid_input"),
    ("empty inputs", _raw('{"inputs": []}'), 422, "invalid_input"),
    ("missing inputs", _raw('{"seq": 1}'), 422, "invalid_input"),
    (
        "too many steps",
        _raw(json.dumps({"inputs": [[0.1, 0.2, 0.3]] * (MAX_STEPS + 1)})),
        413,
        "sequence_too_long",
    ),
    (
        "too large body",
        _raw('{"inputs": [[1, 2, 3]]' + " " * MAX_BODY + "}"),
        413,
        "payload_too_large",
    ),
    ("unknown field", _raw('{"inputs": [[1, 2, 3]], "state": 1}'), 422, "invalid_input"),
    ("not JSON", b"inputs=1,2,3", 422, "invalid_input"),
    ("truncated JSON", _raw('{"inputs": [[1, 2, 3]]'), 422, "invalid_input"),
    ("JSON array body", _raw("[[1, 2, 3]]"), 422, "invalid_input"),
    ("not UTF-8", b'{"inputs": [[1, 2, \xff]]}', 422, "invalid_input"),
    ("seq zero", _raw('{"inputs": [[1, 2, 3]], "seq": 0}'), 422, "invalid_input"),
    ("seq fractional", _raw('{"inputs": [[1, 2, 3]], "seq": 1.5}'), 422, "invalid_input"),
    ("seq far ahead", _raw('{"inputs": [[1, 2, 3]], "seq": 999}'), 409, "seq_mismatch"),
]


async def test_bad_steps_between_good_ones_leave_the_session_untouched(
    make_client, model_repo, reference
):
    ref = reference("tiny-lstm")
    rng = np.random.default_rng(21)
    good = [
        rng.normal(size=(int(rng.integers(1, MAX_STEPS + 1)), 3)).astype(np.float32)
        for _ in BAD_STEPS
    ]
    outputs, count = [], 0
    async with make_client(
        model_repo=model_repo, max_steps_per_request=MAX_STEPS, max_body_bytes=MAX_BODY
    ) as client:
        sid = (await client.post("/v1/models/tiny-lstm/sessions")).json()["session_id"]
        before = (await client.get(f"/v1/sessions/{sid}/state")).json()
        for (label, raw, status, code), x in zip(BAD_STEPS, good):
            r = await client.post(
                f"/v1/sessions/{sid}/steps",
                content=raw,
                headers={"content-type": "application/json"},
            )
            error = _assert_error(r, status, code, label)
            if code == "seq_mismatch":
                assert error["step_count"] == count
            after = (await client.get(f"/v1/sessions/{sid}/state")).json()
            assert after["step_count"] == count, label
            assert after["state"] == before["state"], label  # bit-for-bit untouched
            r = await client.post(f"/v1/sessions/{sid}/steps", json={"inputs": x.tolist()})
            assert r.status_code == 200, (label, r.text)
            count += len(x)
            assert r.json()["step_count"] == count
            outputs.extend(r.json()["outputs"])
            before = (await client.get(f"/v1/sessions/{sid}/state")).json()
        final = before
    y_ref, finals = ref.run(np.concatenate(good))
    np.testing.assert_allclose(np.asarray(outputs), y_ref, atol=TOL)
    assert final["step_count"] == count
    for s in ref.card["states"]:
        np.testing.assert_allclose(
            np.asarray(final["state"][s["input"]]), np.take(finals[s["input"]], 0, axis=1), atol=TOL
        )


async def test_chunked_body_over_the_limit_is_refused(make_client, model_repo):
    """No Content-Length: the limit is enforced while reading, state untouched."""

    async def chunks():
        yield b'{"inputs": [[1, 2, 3]]'
        for _ in range(30):
            yield b" " * 100
        yield b"}"

    async with make_client(model_repo=model_repo, max_body_bytes=MAX_BODY) as client:
        sid = (await client.post("/v1/models/tiny-lstm/sessions")).json()["session_id"]
        r = await client.post(
            f"/v1/sessions/{sid}/steps",
            content=chunks(),
            headers={"content-type": "application/json"},
        )
        assert 400 <= r.status_code < 500, r.text
        assert "Traceback" not in r.text and "error" in r.json()
        assert (await client.get(f"/v1/sessions/{sid}")).json()["step_count"] == 0


async def test_chunked_body_over_the_limit_is_413_payload_too_large(make_client, model_repo):
    async def chunks():
        yield b'{"inputs": [[1, 2, 3]]'
        for _ in range(30):
            yield b" " * 100
        yield b"}"

    async with make_client(model_repo=model_repo, max_body_bytes=MAX_BODY) as client:
        sid = (await client.post("/v1/models/tiny-lstm/sessions")).json()["session_id"]
        r = await client.post(
            f"/v1/sessions/{sid}/steps",
            content=chunks(),
            headers={"content-type": "application/json"},
        )
        _assert_error(r, 413, "payload_too_large")


@pytest.mark.parametrize("seq", ["1", True])
async def test_seq_of_the_wrong_type_is_refused(make_client, model_repo, seq):
    async with make_client(model_repo=model_repo) as client:
        sid = (await client.post("/v1/models/tiny-lstm/sessions")).json()["session_id"]
        r = await client.post(f"/v1/sessions/{sid}/steps", json={"inputs": [[1, 2, 3]], "seq": seq})
        assert (await client.get(f"/v1/sessions/{sid}")).json()["step_count"] == 0
        _assert_error(r, 422, "invalid_input")


async def test_bad_symbols_and_generate_parameters(make_client, model_repo):
    async with make_client(model_repo=model_repo, max_generate_steps=50) as client:
        sid = (await client.post("/v1/models/tiny-gru/sessions")).json()["session_id"]
        r = await client.post(f"/v1/sessions/{sid}/steps", json={"inputs": ["B", "Z"]})
        _assert_error(r, 422, "invalid_input")
        r = await client.post(f"/v1/sessions/{sid}/steps", json={"inputs": ["B", 1.0]})
        _assert_error(r, 422, "invalid_input")
        for body in [
            {"steps": 0},
            {"steps": 51},
            {"steps": 3, "temperature": -1},
            {"steps": 3, "prime": ["Q"]},
            {"steps": 3, "prime": []},
            {"steps": 3, "bogus": 1},
            {},
        ]:
            r = await client.post(f"/v1/sessions/{sid}/generate", json=body)
            _assert_error(r, 422, "invalid_input")
        info = (await client.get(f"/v1/sessions/{sid}")).json()
        assert info["step_count"] == 0


async def test_routing_errors_have_the_same_shape(make_client, model_repo):
    async with make_client(model_repo=model_repo) as client:
        _assert_error(await client.get("/v1/nowhere"), 404, "not_found")
        _assert_error(await client.get("/v1/sessions/abc/steps"), 405, "method_not_allowed")
        _assert_error(await client.get("/v1/models/nope"), 404, "model_not_found")
        _assert_error(await client.post("/v1/models/nope/sessions"), 404, "model_not_found")
        _assert_error(
            await client.post(
                "/v1/models/tiny-lstm/versions/abc/predict", json={"inputs": [[[1, 2, 3]]]}
            ),
            422,
            "invalid_input",
        )
        _assert_error(
            await client.post(
                "/v1/models/tiny-lstm/predict",
                content=b"{",
                headers={"content-type": "application/json"},
            ),
            422,
            "invalid_input",
        )
        _assert_error(
            await client.post(
                "/v1/models/tiny-lstm/predict", json={"inputs": [[[1, 2, 3]]], "extra": True}
            ),
            422,
            "invalid_input",
        )
        _assert_error(
            await client.post("/v1/models/tiny-lstm/sessions", json={"state": None, "x": 1}),
            422,
            "invalid_input",
        )


# -- no request ever produces a 500 -------------------------------------------------------------

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.text(alphabet="BTPSXVEQ0.1-e", max_size=4),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(["h0", "c0", "x", "inputs"]), children, max_size=3)
    ),
    max_leaves=24,
)
_fields = {
    "steps": st.fixed_dictionaries({"inputs": _json}, optional={"seq": _json}),
    "predict": st.fixed_dictionaries(
        {"inputs": st.lists(_json, max_size=3)},
        optional={"initial_states": _json, "return_states": _json, "return_sequences": _json},
    ),
    "create": st.fixed_dictionaries({}, optional={"state": _json}),
    "generate": st.fixed_dictionaries(
        {"steps": _json}, optional={"seed": _json, "temperature": _json, "prime": _json}
    ),
}


def test_fuzzed_bodies_never_give_a_500(model_repo):
    import asyncio

    import httpx

    from service.app import create_app
    from service.config import Settings

    loop = asyncio.new_event_loop()
    app = create_app(Settings(model_repo=model_repo, max_generate_steps=20))
    lifespan = app.router.lifespan_context(app)
    loop.run_until_complete(lifespan.__aenter__())
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")

    async def new(name):
        return (await client.post(f"/v1/models/{name}/sessions")).json()["session_id"]

    sids = {
        name: loop.run_until_complete(new(name)) for name in ["tiny-lstm", "tiny-gru", "tiny-rnn"]
    }
    targets = [
        ("steps", f"/v1/sessions/{sids['tiny-lstm']}/steps"),
        ("steps", f"/v1/sessions/{sids['tiny-gru']}/steps"),
        ("steps", f"/v1/sessions/{sids['tiny-rnn']}/steps"),
        ("predict", "/v1/models/tiny-lstm/predict"),
        ("predict", "/v1/models/tiny-gru/predict"),
        ("create", "/v1/models/tiny-lstm/sessions"),
        ("create", "/v1/models/tiny-gru/sessions"),
        ("generate", f"/v1/sessions/{sids['tiny-gru']}/generate"),
        ("generate", f"/v1/sessions/{sids['tiny-rnn']}/generate"),
    ]

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(target=st.sampled_from(targets), data=st.data())
    def check(target, data):
        kind, path = target
        body = data.draw(_fields[kind] | _json)
        r = loop.run_until_complete(client.post(path, json=body))
        assert r.status_code < 500, (path, body, r.status_code, r.text)
        if r.status_code >= 400:
            error = r.json()["error"]
            assert isinstance(error["code"], str) and isinstance(error["message"], str)

    try:
        check()
    finally:
        loop.run_until_complete(client.aclose())
        loop.run_until_complete(lifespan.__aexit__(None, None, None))
        loop.close()


async def test_states_must_hold_plain_numbers(make_client, model_repo):
    """Numeric strings, booleans, nulls and integers too large for float32 are refused (a huge
    integer used to crash with a 500), for imported and for initial states alike."""
    big = "1" + "0" * 400
    rows = {
        "strings": '[["0.5"' + ', "0.5"' * 11 + "]]",
        "booleans": "[[true" + ", false" * 11 + "]]",
        "null": "[[null" + ", 0" * 11 + "]]",
        "huge integer": f"[[{big}" + ", 0" * 11 + "]]",
        "float32 overflow": "[[1e39" + ", 0" * 11 + "]]",
    }
    async with make_client(model_repo=model_repo, max_sessions=1) as client:
        for label, row in rows.items():
            for path, body in [
                ("/v1/models/tiny-gru/sessions", f'{{"state": {{"h0": {row}}}}}'),
                (
                    "/v1/models/tiny-gru/predict",
                    f'{{"inputs": [["B"]], "initial_states": [{{"h0": {row}}}]}}',
                ),
            ]:
                r = await client.post(
                    path, content=body, headers={"content-type": "application/json"}
                )
                _assert_error(r, 422, "invalid_input", f"{label} {path}")
        # none of them took the only session slot
        assert (await client.post("/v1/models/tiny-gru/sessions")).status_code == 201


async def test_negative_seed_is_refused(make_client, model_repo):
    """A negative seed used to crash numpy's default_rng with a 500."""
    async with make_client(model_repo=model_repo) as client:
        sid = (await client.post("/v1/models/tiny-gru/sessions")).json()["session_id"]
        r = await client.post(f"/v1/sessions/{sid}/generate", json={"steps": 3, "seed": -1})
        _assert_error(r, 422, "invalid_input")
        assert (await client.get(f"/v1/sessions/{sid}")).json()["step_count"] == 0
        r = await client.post(f"/v1/sessions/{sid}/generate", json={"steps": 3, "seed": 10**30})
        _assert_error(r, 422, "invalid_input")  # beyond 64 bits: JSON parsers disagree, refuse
        r = await client.post(f"/v1/sessions/{sid}/generate", json={"steps": 3, "seed": 2**63 - 1})
        assert r.status_code == 200, r.text
