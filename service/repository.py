"""The model repository: ``<repo>/<name>/<version>/{model.onnx,card.json}``.

Each version is validated against its card at load. A bad version is kept, marked not
ready with its error, and never stops the others. Model names from URLs are only ever
looked up in the loaded table, never joined onto a path.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from service.card import CARD_FILE, MODEL_FILE, ModelCard
from service.config import Settings
from service.errors import ModelNotFound, ModelNotReady
from service.runtime import Runner

log = logging.getLogger("service.repository")


@dataclass
class ModelVersion:
    name: str
    version: int
    path: Path
    card: ModelCard | None = None
    runner: Runner | None = None
    error: str | None = None
    fingerprint: tuple[float, int] = (0.0, 0)
    digest: str = ""
    """Identity of the exact model loaded (ONNX file + card); sessions record it."""
    extras: dict = field(default_factory=dict)
    """Per-version objects owned by the server (e.g. its batcher)."""

    @property
    def ready(self) -> bool:
        return self.runner is not None

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.version)


def _fingerprint(folder: Path) -> tuple[float, int]:
    stats = [(folder / f).stat() for f in (MODEL_FILE, CARD_FILE) if (folder / f).exists()]
    return (max((s.st_mtime for s in stats), default=0.0), sum(s.st_size for s in stats))


def load_version(name: str, version: int, folder: Path, settings: Settings) -> ModelVersion:
    entry = ModelVersion(name, version, folder, fingerprint=_fingerprint(folder))
    try:
        card = ModelCard.read(folder / CARD_FILE)
        entry.card = card
        if card.name != name or card.version != version:
            raise ValueError(
                f"card says {card.name}/{card.version} but the folder is {name}/{version}"
            )
        model_path = folder / MODEL_FILE
        if card.sha256 is not None:
            digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
            if digest != card.sha256:
                raise ValueError(f"model.onnx sha256 {digest[:12]}... does not match the card")
        entry.runner = Runner(model_path, card, settings)
    except Exception as exc:  # noqa: BLE001 - any failure marks this version not ready
        entry.error = f"{type(exc).__name__}: {exc}"
        log.error("model %s/%s not loaded: %s", name, version, entry.error)
    else:
        log.info("model %s/%s loaded (%s)", name, version, card.cell)
    return entry


def scan(repo: Path) -> dict[tuple[str, int], Path]:
    found: dict[tuple[str, int], Path] = {}
    if not repo.is_dir():
        return found
    for model_dir in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for version_dir in model_dir.iterdir():
            if version_dir.is_dir() and version_dir.name.isdigit():
                found[(model_dir.name, int(version_dir.name))] = version_dir
    return found


@dataclass
class ReloadReport:
    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class ModelRepository:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.repo = Path(settings.model_repo)
        self._versions: dict[tuple[str, int], ModelVersion] = {}
        self.loaded_once = False

    def sync(
        self, on_unload: Callable[[ModelVersion], None] | None = None
    ) -> tuple[ReloadReport, list[ModelVersion]]:
        """Load new or changed versions, drop removed ones. Blocking: call off the event loop.

        Returns the report and the removed entries (their owners release them).
        """
        report = ReloadReport()
        on_disk = scan(self.repo)
        fresh = dict(self._versions)
        removed: list[ModelVersion] = []
        for key, folder in on_disk.items():
            current = self._versions.get(key)
            if current is not None and current.fingerprint == _fingerprint(folder):
                continue
            entry = load_version(key[0], key[1], folder, self.settings)
            fresh[key] = entry
            (report.loaded if entry.ready else report.failed).append(f"{key[0]}/{key[1]}")
            if current is not None:
                removed.append(current)
        for key in set(self._versions) - set(on_disk):
            removed.append(fresh.pop(key))
            report.unloaded.append(f"{key[0]}/{key[1]}")
        self._versions = fresh  # one assignment: readers see the old or the new table
        self.loaded_once = True
        return report, removed

    def versions(self) -> list[ModelVersion]:
        return sorted(self._versions.values(), key=lambda v: (v.name, v.version))

    def names(self) -> list[str]:
        return sorted({name for name, _ in self._versions})

    def versions_of(self, name: str) -> list[ModelVersion]:
        found = [v for (n, _), v in self._versions.items() if n == name]
        if not found:
            raise ModelNotFound(f"no model named {name!r}")
        return sorted(found, key=lambda v: v.version)

    def for_session(self, name: str, version: int, digest: str) -> ModelVersion:
        """The loaded model a session created on ``name``/``version`` with ``digest`` runs on.

        TODO(hardening issue): refuse a version whose model changed under the session.
        """
        return self.get(name, version)

    def get(self, name: str, version: int | None = None) -> ModelVersion:
        """The ready version asked for, or the highest version when none is named."""
        if version is None:
            entry = self.versions_of(name)[-1]
        else:
            entry = self._versions.get((name, version))
            if entry is None:
                raise ModelNotFound(f"no version {version} of model {name!r}")
        if not entry.ready:
            raise ModelNotReady(
                f"model {name!r} version {entry.version} is not ready: {entry.error}"
            )
        return entry
