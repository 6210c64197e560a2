"""The model repository: ``<repo>/<name>/<version>/{model.onnx,card.json}``.

A reload is a deploy, and a deploy never takes down what is serving:

- a version that loaded keeps serving its loaded copy until a replacement loads; a failed
  reload of it is reported (``error`` in ``/v1/models``, a metric, the log) and changes
  nothing else;
- a version that never loaded is kept, not ready, with its error, and never stops the others;
- unversioned routes use the highest version that is ready;
- each loaded copy has a ``digest`` of its ONNX file and card: a session is bound to the
  digest it was created on, and answers 409 ``model_changed`` once its version serves a
  different model (replaced in place), or 503 ``model_not_ready`` once its version is gone.

Model names and versions from URLs are only ever looked up in the loaded table, never
joined onto a path; versions are ASCII digits only.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from service.card import CARD_FILE, MODEL_FILE, ModelCard
from service.config import Settings
from service.errors import InvalidInput, ModelChanged, ModelNotFound, ModelNotReady
from service.runtime import Runner

log = logging.getLogger("service.repository")

_VERSION = re.compile(r"[0-9]{1,18}")
_RETIRED_CARDS = 256
_ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:[^\s'\"/:]+/)*[^\s'\":]*")


def parse_version(text: str) -> int:
    """A version number from untrusted text: 1 to 18 ASCII digits, nothing else."""
    if not _VERSION.fullmatch(text):
        raise InvalidInput(
            f"version {text[:40]!r} is not a version number (ASCII digits only, e.g. 1)"
        )
    return int(text)


@dataclass
class ModelVersion:
    name: str
    version: int
    path: Path
    card: ModelCard | None = None
    runner: Runner | None = None
    error: str | None = None
    """Why the last load of this folder failed (None when it succeeded). A version that is
    ready with an error serves its previously loaded copy."""
    fingerprint: tuple = ()
    """What the files looked like when the serving copy (or the failed attempt) was read."""
    digest: str = ""
    """Identity of the exact model loaded (ONNX file + card); sessions record it."""
    extras: dict = field(default_factory=dict)
    """Per-version objects owned by the server (e.g. its batcher)."""
    failed_fingerprint: tuple | None = None
    """The files of the last failed reload, so an unchanged broken folder is not retried."""

    @property
    def ready(self) -> bool:
        return self.runner is not None

    @property
    def key(self) -> tuple[str, int]:
        return (self.name, self.version)


def _fingerprint(folder: Path) -> tuple:
    """A cheap change detector (no file is read): a write changes ctime even when a copy
    keeps the old mtime and size (``cp -p``, ``rsync -a``), a rename-into-place the inode."""
    out = []
    for name in (MODEL_FILE, CARD_FILE):
        try:
            st = (folder / name).stat()
        except OSError:
            out.append(None)
            continue
        out.append((st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    return tuple(out)


def _public(message: str, folder: Path, repo: Path) -> str:
    """A load error fit for clients: paths relative to the repository, others elided."""
    for root in {str(repo.resolve()), str(repo)}:
        message = message.replace(root.rstrip("/") + "/", "")
    return _ABSOLUTE_PATH.sub("<path>", message)


def load_version(
    name: str, version: int, folder: Path, settings: Settings, repo: Path | None = None
) -> ModelVersion:
    entry = ModelVersion(name, version, folder, fingerprint=_fingerprint(folder))
    try:
        card_bytes = (folder / CARD_FILE).read_bytes()
        card = ModelCard.model_validate_json(card_bytes)
        entry.card = card
        if card.name != name or card.version != version:
            raise ValueError(
                f"card says {card.name}/{card.version} but the folder is {name}/{version}"
            )
        model_path = folder / MODEL_FILE
        model_bytes = model_path.read_bytes()
        if card.sha256 is not None:
            digest = hashlib.sha256(model_bytes).hexdigest()
            if digest != card.sha256:
                raise ValueError(f"model.onnx sha256 {digest[:12]}... does not match the card")
        entry.runner = Runner(model_path, card, settings)
        identity = hashlib.sha256()
        identity.update(hashlib.sha256(model_bytes).digest())
        identity.update(hashlib.sha256(card_bytes).digest())
        entry.digest = identity.hexdigest()[:32]
    except Exception as exc:  # noqa: BLE001 - any failure marks this attempt failed
        detail = f"{type(exc).__name__}: {exc}"
        entry.error = _public(detail, folder, repo if repo is not None else folder.parent.parent)
        log.error("model %s/%s not loaded: %s", name, version, detail)
    else:
        log.info("model %s/%s loaded (%s)", name, version, card.cell)
    return entry


def scan(repo: Path) -> dict[tuple[str, int], Path]:
    found: dict[tuple[str, int], Path] = {}
    if not repo.is_dir():
        return found
    for model_dir in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for version_dir in sorted(model_dir.iterdir()):
            if not version_dir.is_dir() or version_dir.name.startswith("."):
                continue
            if not _VERSION.fullmatch(version_dir.name):
                log.warning(
                    "skipping %s/%s: a version folder is named with ASCII digits only",
                    model_dir.name,
                    version_dir.name,
                )
                continue
            found[(model_dir.name, int(version_dir.name))] = version_dir
    return found


@dataclass
class ReloadReport:
    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    """Versions whose load failed; a version still serving its previous copy is listed too."""
    errors: dict[str, str] = field(default_factory=dict)
    """name/version -> the client-safe error of each failed load."""


class ModelRepository:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.repo = Path(settings.model_repo)
        self._versions: dict[tuple[str, int], ModelVersion] = {}
        self._names: frozenset[str] = frozenset()
        self._retired: OrderedDict[str, ModelCard] = OrderedDict()
        """Cards of copies no longer served, by digest: their sessions can still export."""
        self.loaded_once = False

    def sync(
        self, on_unload: Callable[[ModelVersion], None] | None = None
    ) -> tuple[ReloadReport, list[ModelVersion]]:
        """Load new or changed versions, drop removed ones. Blocking: call off the event loop.

        A changed version is replaced only once its new copy has loaded; until then the
        loaded copy keeps serving and carries the failed attempt's error. Returns the report
        and the replaced or removed entries (their owners release them).
        """
        report = ReloadReport()
        on_disk = scan(self.repo)
        fresh = dict(self._versions)
        removed: list[ModelVersion] = []
        for key, folder in on_disk.items():
            current = self._versions.get(key)
            seen = _fingerprint(folder)
            if current is not None and seen in (current.fingerprint, current.failed_fingerprint):
                continue
            entry = load_version(key[0], key[1], folder, self.settings, self.repo)
            label = f"{key[0]}/{key[1]}"
            if entry.ready:
                report.loaded.append(label)
                fresh[key] = entry
                if current is not None:
                    removed.append(current)
                continue
            report.failed.append(label)
            assert entry.error is not None
            report.errors[label] = entry.error
            if current is not None and current.ready:
                # Keep serving the loaded copy; report the failed replacement on it.
                current.error = entry.error
                current.failed_fingerprint = seen
                log.error("model %s keeps serving its loaded copy", label)
            else:
                fresh[key] = entry
                if current is not None:
                    removed.append(current)
        for key in set(self._versions) - set(on_disk):
            removed.append(fresh.pop(key))
            report.unloaded.append(f"{key[0]}/{key[1]}")
        for entry in removed:
            if entry.digest and entry.card is not None:
                self._retired[entry.digest] = entry.card
                self._retired.move_to_end(entry.digest)
                while len(self._retired) > _RETIRED_CARDS:
                    self._retired.popitem(last=False)
        self._versions = fresh  # one assignment: readers see the old or the new table
        self._names = frozenset(name for name, _ in fresh)
        self.loaded_once = True
        return report, removed

    def versions(self) -> list[ModelVersion]:
        return sorted(self._versions.values(), key=lambda v: (v.name, v.version))

    def names(self) -> list[str]:
        return sorted(self._names)

    @property
    def known_names(self) -> frozenset[str]:
        """The loaded model names (a fixed set between reloads: safe as metric labels)."""
        return self._names

    def versions_of(self, name: str) -> list[ModelVersion]:
        found = [v for (n, _), v in self._versions.items() if n == name]
        if not found:
            raise ModelNotFound(f"no model named {name!r}")
        return sorted(found, key=lambda v: v.version)

    def for_session(self, name: str, version: int, digest: str) -> ModelVersion:
        """The loaded model a session created on ``name``/``version`` with ``digest`` runs on.

        ModelNotReady (503) when the version is gone or not loaded; ModelChanged (409) when
        the version now serves a different model than the one the session was created on.
        A session without a digest (created before digests existed) runs on what is loaded.
        """
        entry = self._versions.get((name, version))
        if entry is None or not entry.ready:
            raise ModelNotReady(
                f"version {version} of model {name!r}, which this session runs on, is "
                f"{'no longer in the repository' if entry is None else 'not loaded'}; export "
                "its state (GET /v1/sessions/{id}/state) and import it into a session on a "
                "ready version, or create a new session",
                model=name,
                version=version,
            )
        if digest and entry.digest != digest:
            raise ModelChanged(
                f"version {version} of model {name!r} was replaced by a different model since "
                "this session was created, and the session's state belongs to the old one; "
                "delete the session and create a new one (export still works)",
                model=name,
                version=version,
            )
        return entry

    def card_for_session(self, name: str, version: int, digest: str) -> ModelCard:
        """The card of the exact model a session was created on, even when it no longer
        serves (replaced or removed): exporting a state needs only the card."""
        entry = self._versions.get((name, version))
        if entry is not None and entry.card is not None and (
            entry.digest == digest or (not digest and entry.ready)
        ):
            return entry.card
        card = self._retired.get(digest) if digest else None
        if card is not None:
            return card
        return self.for_session(name, version, digest).card  # type: ignore[return-value]

    def get(self, name: str, version: int | None = None) -> ModelVersion:
        """The ready version asked for, or the highest ready version when none is named."""
        if version is None:
            versions = self.versions_of(name)
            ready = [v for v in versions if v.ready]
            if not ready:
                raise ModelNotReady(
                    f"no version of model {name!r} is ready: "
                    + "; ".join(f"version {v.version}: {v.error}" for v in versions),
                    model=name,
                )
            return ready[-1]
        entry = self._versions.get((name, version))
        if entry is None:
            raise ModelNotFound(f"no version {version} of model {name!r}")
        if not entry.ready:
            raise ModelNotReady(
                f"model {name!r} version {entry.version} is not ready: {entry.error}",
                model=name,
                version=version,
            )
        return entry
