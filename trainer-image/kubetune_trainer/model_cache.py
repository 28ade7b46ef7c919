"""A base-model cache shared by attempts and jobs: each model is downloaded once.

The operator mounts a ReadWriteMany volume in every trainer pod and names it in
``$KUBETUNE_MODEL_CACHE``; without it every attempt downloads its base model into its
own scratch space (16 GB for an 8B model, each time). Layout under the cache root::

    <name>-<hash>/                one per (source, revision): hash of both, name readable
        .lock                     flock'ed by the one process filling this entry
        <version>/                a complete copy, never changed once in place:
            model/                    the files, as the source has them
            kubetune-cache.json       written last: what was fetched, sizes, digests, timing
        .partial-<pid>-<random>/  a fill in progress, or what a killed one left behind

``<version>`` names the source's content: the hub's commit for hf://, a digest of the
listing (keys, sizes, ETags) for s3://. A model overwritten at the same prefix is fetched
again into a new version, so a copy never changes under a job that is reading it.

Filling: under an exclusive ``flock`` of the entry's lock file (the kernel releases it
when its holder dies, however it dies), the downloader removes what earlier, killed
downloaders left (``.partial-*``), downloads into a new ``.partial-*`` directory,
checks every file against the source's listing (sizes always; the MD5 of a single-part
S3 ETag and the hub's LFS sha256 where the source gives them; a mismatch is downloaded
again once), fsyncs, writes the manifest, and renames the directory into place. A copy
without its manifest (or whose files do not have the manifest's sizes) is never used.
A second downloader of the same model waits on the lock and then finds the copy.

On NFS (most ReadWriteMany volumes), ``flock`` is carried by NFSv4's byte-range locks
(Linux emulates it since 2.6.12), whose lease the server ends when a client dies; a
filesystem without working locks (NFSv3 mounted ``nolock``) would let two downloaders
fill at once: each writes its own ``.partial-*`` and the renames stay atomic, so the
result is still one complete copy, only downloaded twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import MODEL_CACHE_ENV
from .errors import ConfigInvalid, StorageUnavailable

log = logging.getLogger("kubetune.trainer")

MANIFEST = "kubetune-cache.json"
MODEL_DIR = "model"
PARTIAL = ".partial-"
LOCK = ".lock"
DOWNLOAD_TRIES = 2  # a download that does not match the listing is fetched once more
HUB_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja")
_MD5 = re.compile(r"^[0-9a-f]{32}$")


# ------------------------------------------------------------------------------ sources


@dataclass(frozen=True)
class RemoteFile:
    """One file of a model as its source lists it (digests where the source has them)."""

    path: str  # relative, "/"-separated
    size: int
    md5: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Listing:
    """What a source holds now: a version naming that content, and its files."""

    version: str
    files: tuple[RemoteFile, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


class SourceUnreachable(Exception):
    """The source could not say what it holds (the hub is unreachable, say): a complete
    copy in the cache is used as it is."""


class Source(ABC):
    """Where a base model comes from."""

    uri: str
    revision: str | None = None

    @abstractmethod
    def describe(self) -> Listing:
        """The source's current listing (no file content is read)."""

    @abstractmethod
    def download(self, listing: Listing, target: Path) -> None:
        """Write the listed files under ``target`` (their relative paths)."""


class S3Source(Source):
    """A model saved with save_pretrained under ``s3://bucket/prefix``."""

    def __init__(
        self,
        uri: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        settings: Any = None,
    ) -> None:
        from .storage import S3Store, open_store

        self.uri, self.revision = uri, None
        store = open_store(uri, endpoint_url=endpoint_url, region=region, settings=settings)
        if not isinstance(store, S3Store):
            raise ConfigInvalid(f"{uri!r} is not an s3:// URI", hint="write s3://bucket/prefix")
        self.store = store

    def describe(self) -> Listing:
        objects = [o for o in self.store.list_details("") if o.key and not o.key.endswith("/")]
        if not objects:
            raise ConfigInvalid(
                f"{self.uri} does not exist (no objects under it)",
                hint="check the URI, and that the model was uploaded to this bucket",
            )
        files = tuple(
            RemoteFile(o.key, o.size, md5=o.etag if _MD5.match(o.etag) else None) for o in objects
        )
        text = json.dumps([[o.key, o.size, o.etag] for o in objects])
        return Listing(hashlib.sha256(text.encode()).hexdigest()[:16], files)

    def download(self, listing: Listing, target: Path) -> None:
        for file in listing.files:
            self.store.download_file(file.path, target.joinpath(*file.path.split("/")))


class HubSource(Source):
    """A model on the Hugging Face hub (``hf://org/name`` at a revision)."""

    def __init__(self, repo_id: str, revision: str | None, token: str | None) -> None:
        self.uri, self.revision = f"hf://{repo_id}", revision
        self.repo_id, self.token = repo_id, token

    def describe(self) -> Listing:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        unreachable: tuple[type[Exception], ...] = (
            HfHubHTTPError,
            OfflineModeIsEnabled,
            OSError,
            *_transport_errors(),
        )
        try:
            info = HfApi().model_info(
                self.repo_id, revision=self.revision, token=self.token, files_metadata=True
            )
        except (GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError):
            raise  # the caller names the fix
        except unreachable as error:
            status = getattr(getattr(error, "response", None), "status_code", None)
            if isinstance(status, int) and 400 <= status < 500 and status != 429:
                raise
            raise SourceUnreachable(f"{self.uri}: {error}") from error
        files = tuple(
            RemoteFile(
                s.rfilename, int(s.size or 0), sha256=s.lfs.sha256 if s.lfs is not None else None
            )
            for s in info.siblings or []
            if any(fnmatch.fnmatch(s.rfilename, p) for p in HUB_PATTERNS)
        )
        return Listing(str(info.sha), files)

    def download(self, listing: Listing, target: Path) -> None:
        from huggingface_hub import snapshot_download

        snapshot_download(
            self.repo_id,
            revision=listing.version,  # the commit described: not a branch that moved since
            token=self.token,
            local_dir=str(target),
            allow_patterns=list(HUB_PATTERNS),
        )
        shutil.rmtree(target / ".cache", ignore_errors=True)  # the hub client's own notes


def _transport_errors() -> tuple[type[Exception], ...]:
    """The hub client's connection errors (its HTTP library's; not OSErrors)."""
    try:
        from httpx2 import TransportError
    except ImportError:  # another version of huggingface_hub
        return ()
    return (TransportError,)


# ------------------------------------------------------------------------------ the cache


@dataclass(frozen=True)
class CacheResult:
    """Where the model is, and what the cache did for it."""

    path: Path  # the model's directory
    hit: bool
    source: str
    revision: str | None
    version: str
    bytes: int
    files: int
    # A miss: this download's seconds; a hit: those the copy's download took (saved now).
    download_seconds: float
    waited_seconds: float  # waiting for another process's download of the same model

    def report(self) -> dict[str, Any]:
        """For /progress, the artifact's manifest and the summary."""
        return {
            "hit": self.hit,
            "source": self.source,
            "revision": self.revision,
            "version": self.version,
            "bytes": self.bytes,
            "files": self.files,
            "downloadSeconds": round(self.download_seconds, 3),
            "savedSeconds": round(self.download_seconds if self.hit else 0.0, 3),
            "waitedSeconds": round(self.waited_seconds, 3),
            "path": str(self.path),
        }

    def summary(self) -> str:
        size = _human(self.bytes)
        if self.hit:
            waited = f", after waiting {self.waited_seconds:.1f} s for its download" * (
                self.waited_seconds >= 0.05
            )
            return (
                f"hit: {self.source} ({size}) from the shared cache{waited}; "
                f"saved a {self.download_seconds:.1f} s download"
            )
        return f"miss: downloaded {self.source} ({size}) in {self.download_seconds:.1f} s"


class ModelCache:
    """Complete copies of base models under ``root`` (see the module's docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ModelCache | None:
        """The cache ``$KUBETUNE_MODEL_CACHE`` names; None if unset, or (with a warning)
        if the directory cannot be written: a broken cache volume never fails a job."""
        value = (environ if environ is not None else os.environ).get(MODEL_CACHE_ENV, "")
        if not value.strip():
            return None
        root = Path(value)
        try:
            _make_shared_dir(root)
            probe = root / f".probe-{os.getpid()}-{secrets.token_hex(4)}"
            probe.touch()
            probe.unlink()
        except OSError as error:
            log.warning(
                "model cache %s is not writable (%s): downloading the model without it",
                root,
                error,
            )
            return None
        return cls(root)

    def entry(self, uri: str, revision: str | None) -> Path:
        """The directory of (source, revision): a readable name and a hash of both."""
        digest = hashlib.sha256(f"{uri}\n{revision or ''}".encode()).hexdigest()[:16]
        name = re.sub(r"[^A-Za-z0-9._]+", "-", uri.replace("://", "-")).strip("-.")[:48]
        return self.root / f"{name or 'model'}-{digest}"

    def fetch(self, source: Source) -> CacheResult:
        """The model's directory in the cache, downloaded first if no complete copy of
        the source's current content is there."""
        entry = self.entry(source.uri, source.revision)
        try:
            listing = source.describe()
        except SourceUnreachable as error:
            found = _newest_complete(entry)
            if found is None:
                raise StorageUnavailable(
                    f"cannot reach {source.uri} and the model cache has no copy of it: {error}",
                    hint="check the pod's network access to the hub; the next attempt tries again",
                ) from None
            log.warning("model cache: %s; using the cached copy %s", error, found[0].name)
            return _result(found[0], found[1], hit=True, waited=0.0)
        version = entry / _safe_name(listing.version)
        manifest = _usable(version, listing)
        if manifest is not None:
            return _result(version, manifest, hit=True, waited=0.0)
        _make_shared_dir(entry)
        with _exclusive(entry / LOCK, source.uri) as waited:
            manifest = _usable(version, listing)  # filled while we waited
            if manifest is not None:
                return _result(version, manifest, hit=True, waited=waited)
            _discard_leftovers(entry, version)
            manifest = _fill(source, listing, entry, version)
            return _result(version, manifest, hit=False, waited=waited)


def _fill(source: Source, listing: Listing, entry: Path, version: Path) -> dict[str, Any]:
    """Download into a .partial directory, check, write the manifest, rename into place."""
    temp = entry / f"{PARTIAL}{os.getpid()}-{secrets.token_hex(4)}"
    # Group-writable files and folders: pods of the namespace that run as another UID but
    # share the pods' fsGroup can remove what a killed download of ours left behind.
    umask = os.umask(0o002)
    try:
        for tries in range(1, DOWNLOAD_TRIES + 1):
            shutil.rmtree(temp, ignore_errors=True)
            (temp / MODEL_DIR).mkdir(parents=True)
            started = time.monotonic()
            source.download(listing, temp / MODEL_DIR)
            seconds = time.monotonic() - started
            problems = verify(temp / MODEL_DIR, listing)
            if not problems:
                break
            log.warning(
                "model cache: download %d of %s does not match the source (%s)%s",
                tries,
                source.uri,
                "; ".join(problems[:3]),
                "; downloading it again" if tries < DOWNLOAD_TRIES else "",
            )
        else:
            raise StorageUnavailable(
                f"the download of {source.uri} does not match what the source lists: "
                + "; ".join(problems[:3]),
                hint="the model may be being replaced at its source; the next attempt "
                "downloads it again",
            )
        _fsync_tree(temp / MODEL_DIR)
        manifest = {
            "complete": True,
            "source": source.uri,
            "revision": source.revision,
            "version": listing.version,
            "files": {f.path: _file_record(f) for f in listing.files},
            "bytes": listing.size,
            "downloadSeconds": round(seconds, 3),
            "completedAt": time.time(),
        }
        _write_durably(temp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
        os.rename(temp, version)  # atomic: the copy appears whole or not at all
        _fsync_dir(entry)
        return manifest
    finally:
        os.umask(umask)
        shutil.rmtree(temp, ignore_errors=True)  # gone after a rename; leftovers otherwise


def verify(directory: Path, listing: Listing) -> list[str]:
    """How the files under ``directory`` differ from ``listing`` (empty: they match)."""
    problems = []
    for file in listing.files:
        path = directory.joinpath(*file.path.split("/"))
        if not path.is_file():
            problems.append(f"{file.path} is missing")
            continue
        size = path.stat().st_size
        if size != file.size:
            problems.append(f"{file.path} has {size} bytes, the source lists {file.size}")
            continue
        for algorithm, expected in (("md5", file.md5), ("sha256", file.sha256)):
            if expected is not None:
                with path.open("rb") as handle:
                    actual = hashlib.file_digest(handle, algorithm).hexdigest()
                if actual != expected:
                    problems.append(f"{file.path} has {algorithm} {actual}, not {expected}")
    return problems


def _usable(version: Path, listing: Listing | None = None) -> dict[str, Any] | None:
    """The manifest of a complete copy whose files are there with the recorded sizes
    (and, given a listing, match it); None for anything else."""
    try:
        manifest = json.loads((version / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("complete") is not True:
        return None
    if listing is not None and (
        manifest.get("version") != listing.version
        or files != {f.path: _file_record(f) for f in listing.files}
    ):
        return None
    model = version / MODEL_DIR
    for name, record in files.items():
        try:
            if model.joinpath(*name.split("/")).stat().st_size != record.get("size"):
                return None
        except (OSError, AttributeError):
            return None
    return dict(manifest)


def _newest_complete(entry: Path) -> tuple[Path, dict[str, Any]] | None:
    """The most recently completed usable copy of an entry (for an unreachable source)."""
    found = []
    for version in entry.iterdir() if entry.is_dir() else ():
        manifest = _usable(version) if not version.name.startswith(".") else None
        if manifest is not None:
            found.append((float(manifest.get("completedAt") or 0), version, manifest))
    if not found:
        return None
    _, version, manifest = max(found, key=lambda item: item[0])
    return version, manifest


def _discard_leftovers(entry: Path, version: Path) -> None:
    """Under the lock: remove killed downloaders' .partial directories and a damaged
    copy of ``version`` (moved aside first, so that its name is free at once)."""
    for leftover in entry.glob(f"{PARTIAL}*"):
        log.warning("model cache: removing %s, left by an interrupted download", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
    if version.exists():
        log.warning("model cache: %s is incomplete or damaged; downloading it again", version)
        aside = entry / f"{PARTIAL}damaged-{secrets.token_hex(4)}"
        os.rename(version, aside)
        shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def _exclusive(path: Path, what: str) -> Iterator[float]:
    """Hold an exclusive flock on ``path``; yields the seconds spent waiting for it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
    except PermissionError:  # created by another user: a local flock needs no write access
        fd = os.open(path, os.O_RDONLY)
    try:
        started = time.monotonic()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("model cache: another process is downloading %s; waiting for it", what)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield time.monotonic() - started
    finally:
        os.close(fd)  # releases the lock


def _result(version: Path, manifest: dict[str, Any], *, hit: bool, waited: float) -> CacheResult:
    files = manifest.get("files") or {}
    return CacheResult(
        path=version / MODEL_DIR,
        hit=hit,
        source=str(manifest.get("source")),
        revision=manifest.get("revision"),
        version=str(manifest.get("version")),
        bytes=int(manifest.get("bytes") or sum(int(r.get("size", 0)) for r in files.values())),
        files=len(files),
        download_seconds=float(manifest.get("downloadSeconds") or 0.0),
        waited_seconds=waited,
    )


def _file_record(file: RemoteFile) -> dict[str, Any]:
    record: dict[str, Any] = {"size": file.size}
    if file.md5 is not None:
        record["md5"] = file.md5
    if file.sha256 is not None:
        record["sha256"] = file.sha256
    return record


def _safe_name(version: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", version)[:64].lstrip(".")
    return name or "unversioned"


def _make_shared_dir(path: Path) -> None:
    """Create ``path``, group-writable where we can: pods of other jobs (same fsGroup)
    take its lock and clean up after our killed downloads."""
    path.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o2775)


def _write_durably(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_tree(directory: Path) -> None:
    """Flush every downloaded file (and folder) to the volume before the rename makes the
    copy visible: after a node crash a complete-looking copy must have its data."""
    for path in sorted(directory.rglob("*"), reverse=True):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse to fsync a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{size} B"
        value /= 1024
    return f"{size} B"
