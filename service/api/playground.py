"""The browser playground: ``/`` and its static files, shipped inside the package.

The page itself is public (it holds no data); everything it shows comes from the public
API, which asks for a key as usual. A request names a file only by matching one of the
package's own playground files, so a request path never becomes a file path.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from starlette.exceptions import HTTPException
from starlette.responses import Response

router = APIRouter(tags=["playground"], include_in_schema=False)

_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
}
_HEADERS = {
    # Same-origin scripts, styles and API calls only: the page works offline and loads
    # nothing from elsewhere.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def _asset(name: str) -> Response:
    folder = files("service").joinpath("playground")
    for entry in folder.iterdir():
        media_type = _MEDIA_TYPES.get(entry.name[entry.name.rfind(".") :])
        if entry.name == name and media_type is not None:
            return Response(entry.read_bytes(), media_type=media_type, headers=_HEADERS)
    raise HTTPException(404, "no such playground file")  # answered as 404 not_found


@router.get("/")
async def index() -> Response:
    """The playground page."""
    return _asset("index.html")


@router.get("/playground/{name}")
async def asset(name: str) -> Response:
    """One of the page's scripts or its style sheet."""
    return _asset(name)
