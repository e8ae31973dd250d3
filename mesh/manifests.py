"""Worlds from Kubernetes manifests on disk: a file or a directory of YAML/JSON.

The files look like what ``kubectl get -o yaml`` prints: one object per document,
multi-document YAML, or ``kind: List`` with ``items``. A directory is read recursively
(``*.yaml``, ``*.yml``, ``*.json``), skipping hidden entries, so a mounted ConfigMap's
``..data`` links are not read twice.

A broken file (a YAML error, a document that is not a map, unreadable bytes) keeps the
objects it last held when it was good and adds a :class:`SourceError` naming the file and
the reason; other files are unaffected, and fixing the file clears the error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mesh.build import build_world, flatten_lists
from mesh.model import SourceError, World
from mesh.sources import ChangeFilter, Publish

logger = logging.getLogger(__name__)

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

Objects = list[Mapping[str, Any]]
#: (mtime_ns, ctime_ns, size, inode) of one file.
_Stamp = tuple[int, int, int, int]


class BrokenFile(ValueError):
    """A manifest file that cannot be read as Kubernetes objects."""


def load_objects(path: Path) -> tuple[Objects, list[SourceError]]:
    """Read every object under ``path`` once; broken files become errors, not exceptions."""
    objects: Objects = []
    errors: list[SourceError] = []
    files, missing = _manifest_files(path)
    if missing is not None:
        errors.append(missing)
    for file in files:
        try:
            objects.extend(read_manifest(file))
        except BrokenFile as exc:
            errors.append(SourceError(str(file), str(exc)))
    return objects, errors


def load_world(path: Path) -> World:
    """A World from the manifests under ``path``, read once."""
    objects, errors = load_objects(path)
    return build_world(objects, source_errors=errors)


def read_manifest(file: Path) -> Objects:
    """The objects in one file, Lists expanded. Raises :class:`BrokenFile` saying why."""
    try:
        text = file.read_bytes().decode("utf-8-sig")
        if file.suffix.lower() == ".json":
            loaded = json.loads(text)
            documents = loaded if isinstance(loaded, list) else [loaded]
        else:
            documents = list(yaml.load_all(text, Loader=_Loader))
    except UnicodeDecodeError as exc:
        raise BrokenFile(f"not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise BrokenFile(f"cannot be parsed: {_one_line(exc)}") from None
    except OSError as exc:
        raise BrokenFile(f"cannot be read: {exc.strerror or exc}") from None
    objects: Objects = []
    for index, obj in enumerate(flatten_lists(d for d in documents if d is not None)):
        if not isinstance(obj, Mapping):
            raise BrokenFile(f"object {index + 1} is a {type(obj).__name__}, not a map")
        objects.append(obj)
    return objects


def _one_line(exc: BaseException) -> str:
    return re.sub(r"\s+", " ", str(exc)).strip()


def _manifest_files(path: Path) -> tuple[list[Path], SourceError | None]:
    """The manifest files under ``path``, sorted; or an error if ``path`` does not exist."""
    if path.is_file():
        return [path], None
    if not path.is_dir():
        return [], SourceError(str(path), "does not exist or is not a file or directory")
    found: list[Path] = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(
            Path(root, name)
            for name in names
            if not name.startswith(".") and name.lower().endswith(MANIFEST_SUFFIXES)
        )
    return sorted(found), None


@dataclass(frozen=True)
class _FileState:
    #: (mtime_ns, ctime_ns, size, inode): an in-place rewrite of equal size still changes
    #: ctime, and a replace-by-rename changes the inode.
    stamp: _Stamp
    objects: Objects
    error: str | None = None


class ManifestSource:
    """A :class:`~mesh.sources.WorldSource` that re-reads manifests when they change.

    Changes are found by polling each file's mtime, ctime, size and inode, and the set of
    files, every ``poll_interval`` seconds. Polling needs no extra dependency and works on
    every file system, including network mounts and the symlink swaps of a mounted
    ConfigMap, where inotify-style watches miss events. Unchanged files are not re-read;
    the World is rebuilt only when something changed, and published only when it differs.

    If the path itself disappears, the last objects are kept and the World carries a
    SourceError: a missing mount should not empty the mesh.
    """

    def __init__(self, path: Path, poll_interval: float = 0.2) -> None:
        self._path = Path(path)
        self._poll_interval = poll_interval
        self._files: dict[Path, _FileState] = {}
        self._missing: SourceError | None = None
        self._scans = 0

    @property
    def path(self) -> Path:
        return self._path

    @property
    def scans(self) -> int:
        """How many times the files have been checked so far."""
        return self._scans

    async def run(self, publish: Publish) -> None:
        changes = ChangeFilter(publish)
        first = True
        while True:
            world = await asyncio.to_thread(self._poll, first)
            first = False
            if world is not None and changes(world):
                logger.info(
                    "manifests under %s: %d enabled services, %d workloads, %d errors",
                    self._path,
                    len(world.services),
                    len(world.workloads),
                    len(world.source_errors),
                )
            await asyncio.sleep(self._poll_interval)

    def _poll(self, force: bool) -> World | None:
        """Re-scan (in a worker thread) and build a World if anything changed."""
        changed = self._rescan()
        world = None
        if changed or force:
            world = build_world(self._objects(), source_errors=self._errors())
        self._scans += 1
        return world

    def _rescan(self) -> bool:
        """Bring the per-file state up to date; say whether anything changed."""
        files, missing = _manifest_files(self._path)
        changed = missing != self._missing
        self._missing = missing
        if missing is not None:
            return changed
        current: dict[Path, _FileState] = {}
        for file in files:
            stamp = _stamp(file)
            if stamp is None:  # removed between the listing and the stat
                continue
            previous = self._files.get(file)
            if previous is not None and previous.stamp == stamp:
                current[file] = previous
                continue
            current[file] = self._read(file, stamp, previous)
            changed = True
        changed = changed or current.keys() != self._files.keys()
        self._files = current
        return changed

    @staticmethod
    def _read(
        file: Path, stamp: tuple[int, int, int, int], previous: _FileState | None
    ) -> _FileState:
        try:
            objects = read_manifest(file)
        except BrokenFile as exc:
            logger.warning("manifest %s: %s; keeping its last good objects", file, exc)
            kept = previous.objects if previous is not None else []
            return _FileState(stamp=stamp, objects=kept, error=str(exc))
        if previous is not None and previous.error is not None:
            logger.info("manifest %s: readable again", file)
        return _FileState(stamp=stamp, objects=objects)

    def _objects(self) -> Iterable[Mapping[str, Any]]:
        for file in sorted(self._files):
            yield from self._files[file].objects

    def _errors(self) -> list[SourceError]:
        errors = [
            SourceError(str(file), state.error)
            for file, state in sorted(self._files.items())
            if state.error is not None
        ]
        if self._missing is not None:
            errors.append(self._missing)
        return errors


def _stamp(file: Path) -> _Stamp | None:
    try:
        st = file.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
