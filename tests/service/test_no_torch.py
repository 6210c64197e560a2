"""The serving package must never import torch (the serving install has no torch)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import service

ROOT = Path(__file__).resolve().parents[2]


def _all_modules() -> list[str]:
    names = ["service"]
    for info in pkgutil.walk_packages(service.__path__, prefix="service."):
        names.append(info.name)
    return sorted(names)


def test_every_service_module_imports_without_torch():
    modules = _all_modules()
    assert {
        "service.app",
        "service.cli",
        "service.engine",
        "service.batching",
        "service.api.stream",
    } <= set(modules)
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'training')))\n"
        "assert not bad, bad\n"
        "from service.app import create_app\n"
        "from service.config import Settings\n"
        "create_app(Settings(model_repo='nowhere'))\n"
        "assert 'torch' not in sys.modules\n"
        "print('ok', len(sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")
