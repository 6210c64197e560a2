"""The playground's routes: the page and every file it references are served from the
package, publicly (also with API keys on), with a same-origin-only content policy."""

from __future__ import annotations

import re

import pytest

from tests.conftest import DEMO_MODELS

_REFERENCES = re.compile(r"""(?:src|href)="(playground/[^"]+)"|from "\./([^"]+)\"""")


async def test_the_page_and_everything_it_loads_are_served(make_client):
    async with make_client(model_repo=str(DEMO_MODELS), api_keys=["k1"]) as client:
        page = await client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        seen: set[str] = set()
        pending = ["/"]
        while pending:
            path = pending.pop()
            answer = await client.get(path)
            assert answer.status_code == 200, path
            for direct, imported in _REFERENCES.findall(answer.text):
                target = f"/{direct}" if direct else f"/playground/{imported}"
                if target not in seen:
                    seen.add(target)
                    pending.append(target)
        assert {"/playground/app.js", "/playground/style.css", "/playground/api.js"} <= seen
        js = await client.get("/playground/app.js")
        assert js.headers["content-type"].startswith("text/javascript")
        # The API itself still needs the key.
        assert (await client.get("/v1/models")).status_code == 401


@pytest.mark.parametrize("path", ["/playground/nothing.js", "/playground/..%2Fapp.py", "/playground/"])
async def test_only_the_playground_files_are_served(make_client, path):
    async with make_client(model_repo=str(DEMO_MODELS)) as client:
        answer = await client.get(path)
        assert answer.status_code == 404
        assert answer.json()["error"]["code"] == "not_found"
