"""The Open Inference Protocol (KServe v2) surface. Filled in by the OIP work."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["v2"])
