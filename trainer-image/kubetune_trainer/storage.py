"""Object storage addressed by URI: ``s3://bucket/prefix``, ``file:///dir`` or a plain path.

``open_store(uri)`` gives a :class:`Store` rooted at the URI. Keys are relative to that
root and "/"-separated; ``list`` and ``delete_prefix`` match keys by plain string prefix,
as S3 does (``"step-1"`` also matches ``"step-10/…"``; pass ``"step-1/"`` for a folder).

S3 (and S3-compatible stores such as SeaweedFS or MinIO) goes through boto3 with the
standard credential chain, i.e. ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` from
the pod's Secret. Failures become :mod:`kubetune_trainer.errors` with a hint: rejected
credentials → ``CredentialsInvalid`` and a missing bucket → ``ConfigInvalid``, both at
once; transient failures (connection refused or reset, timeouts, 5xx, throttling) are
retried with backoff and jitter for ``S3Settings.retry_seconds`` (60 s by default,
``spec.output.retryTimeoutSeconds``), each retry logged once, so a restart of the storage
service costs no attempt; an endpoint that stays unreachable, slow, throttled or failing
beyond that → ``StorageUnavailable`` (retryable). Every call is safe to repeat whole
(PUTs replace, a download lands by rename, a listing starts over). Messages name the
bucket and endpoint, never a credential. Local stores write atomically (temp file, then
``os.replace``).
"""

from __future__ import annotations

import builtins
import logging
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import unquote, urlparse

import boto3
from boto3.exceptions import RetriesExceededError, S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from .errors import ConfigInvalid, CredentialsInvalid, StorageUnavailable, TrainerError
from .retry import Backoff, RetriesExhausted, call_with_retries

log = logging.getLogger(__name__)
T = TypeVar("T")

MiB = 1024 * 1024
_PARTIAL = ".partial"  # suffix of a local store's temp files; never listed
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "InvalidToken",
        "ExpiredToken",
        "InvalidClientTokenId",
        "403",
    }
)
_BUCKET_CODES = frozenset({"NoSuchBucket", "InvalidBucketName"})
_UNAVAILABLE_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable"}
)


@dataclass(frozen=True)
class S3Settings:
    """Transfer, retry and timeout settings of S3 stores; the defaults suit production."""

    multipart_threshold: int = 64 * MiB
    multipart_chunksize: int = 16 * MiB  # S3 parts must be at least 5 MiB
    max_attempts: int = 5  # botocore "standard" retry mode, first attempt included
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    # Around botocore's own retries (which give up within about a second on a refused
    # connection): keep retrying transient failures this long, with backoff and jitter.
    retry_seconds: float = 60.0

    @property
    def backoff(self) -> Backoff:
        return Backoff(patience=self.retry_seconds)


@dataclass(frozen=True, order=True)
class ObjectInfo:
    """One object of an S3 listing: its key (relative to the store's root), size and ETag
    (without quotes; the MD5 of the content for a single-part upload, "<md5>-<parts>"
    for a multipart one)."""

    key: str
    size: int
    etag: str


class Store(ABC):
    """Objects under one root; keys are relative to it and "/"-separated."""

    @abstractmethod
    def upload_file(self, local: Path, key: str) -> None:
        """Store the local file ``local`` as ``key`` (replacing any earlier object)."""

    @abstractmethod
    def download_file(self, key: str, local: Path) -> None:
        """Write ``key`` to ``local``, creating its folder. FileNotFoundError if absent."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Store ``data`` as ``key``."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The content of ``key``. FileNotFoundError if absent."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object named exactly ``key`` exists."""

    @abstractmethod
    def list(self, key_prefix: str = "") -> builtins.list[str]:
        """All keys starting with ``key_prefix`` (relative to the root), sorted."""

    @abstractmethod
    def delete_prefix(self, key_prefix: str) -> None:
        """Delete every key starting with ``key_prefix``."""

    @abstractmethod
    def uri_for(self, key: str) -> str:
        """The URI of ``key`` (``open_store`` of it addresses what lies under it)."""

    def upload_dir(self, local_dir: Path, key_prefix: str) -> builtins.list[str]:
        """Upload every file under ``local_dir`` to ``key_prefix/<relative path>``."""
        if not local_dir.is_dir():
            raise FileNotFoundError(f"{local_dir} is not a directory")
        keys = []
        for path in sorted(local_dir.rglob("*")):
            if path.is_file():
                key = _as_folder(key_prefix) + path.relative_to(local_dir).as_posix()
                self.upload_file(path, key)
                keys.append(key)
        return keys

    def download_prefix(self, key_prefix: str, local_dir: Path) -> builtins.list[Path]:
        """Download every key under the folder ``key_prefix`` into ``local_dir``."""
        folder = _as_folder(key_prefix)
        paths = []
        for key in self.list(folder):
            relative = key[len(folder) :]
            if not relative or relative.endswith("/"):
                continue  # a zero-byte "folder" marker some S3 tools write
            target = local_dir.joinpath(*_clean_key(relative).split("/"))
            self.download_file(key, target)
            paths.append(target)
        return paths


def open_store(
    uri: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    settings: S3Settings | None = None,
) -> Store:
    """The store rooted at ``uri`` (``s3://bucket/prefix``, ``file:///dir`` or a path)."""
    scheme, bucket, path = _split_uri(uri)
    if scheme == "s3":
        return S3Store(bucket, path, endpoint_url=endpoint_url, region=region, settings=settings)
    return LocalStore(Path(path))


def fetch_to_local(
    uri: str,
    cache_dir: Path,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    settings: S3Settings | None = None,
) -> Path:
    """A local file or directory with the content of ``uri``.

    Local URIs are returned as they are (after checking they exist). An S3 URI naming
    an object is downloaded to ``cache_dir/<bucket>/<key>``; one naming a prefix (a
    "folder") is downloaded to that directory, which is returned.
    """
    scheme, bucket, path = _split_uri(uri)
    if scheme != "s3":
        local = Path(path)
        if not local.exists():
            raise ConfigInvalid(
                f"{uri} does not exist",
                hint="check the path; in a pod it must lie on a mounted volume",
            )
        return local
    store = S3Store(bucket, "", endpoint_url=endpoint_url, region=region, settings=settings)
    target = cache_dir.joinpath(bucket, *[part for part in path.split("/") if part])
    if path and not path.endswith("/") and store.exists(path):
        store.download_file(path, target)
    elif not store.download_prefix(path, target):
        raise ConfigInvalid(
            f"{uri} does not exist (no object, and no objects under it)",
            hint="check the URI, and that the data was uploaded to this bucket",
        )
    log.info("fetched %s to %s", uri, target)
    return target


# -- local stores --------------------------------------------------------------------


class LocalStore(Store):
    """Files under a local directory (created on the first write)."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().absolute()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*[part for part in _clean_key(key).split("/") if part])

    def upload_file(self, local: Path, key: str) -> None:
        with local.open("rb") as source:
            _write_atomically(self._path(key), lambda out: shutil.copyfileobj(source, out))

    def download_file(self, key: str, local: Path) -> None:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"{self.uri_for(key)} does not exist")
        with path.open("rb") as source:
            _write_atomically(local, lambda out: shutil.copyfileobj(source, out))

    def put_bytes(self, key: str, data: bytes) -> None:
        _write_atomically(self._path(key), lambda out: out.write(data))

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"{self.uri_for(key)} does not exist")
        return path.read_bytes()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, key_prefix: str = "") -> builtins.list[str]:
        folder = self._path(_clean_key(key_prefix).rpartition("/")[0])
        if not folder.is_dir():
            return []
        keys = (
            path.relative_to(self.root).as_posix()
            for path in folder.rglob("*")
            if path.is_file() and not path.name.endswith(_PARTIAL)
        )
        return sorted(key for key in keys if key.startswith(key_prefix))

    def delete_prefix(self, key_prefix: str) -> None:
        for key in self.list(key_prefix):
            path = self._path(key)
            path.unlink(missing_ok=True)
            _remove_empty_parents(path.parent, self.root)

    def uri_for(self, key: str) -> str:
        return self._path(key).as_uri()


def _write_atomically(target: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``target`` through a temp file in its folder, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=_PARTIAL)
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _remove_empty_parents(folder: Path, stop: Path) -> None:
    """Remove ``folder`` and its parents while they are empty, up to (not including) stop."""
    while folder != stop and stop in folder.parents:
        try:
            folder.rmdir()
        except OSError:  # not empty (or already gone)
            return
        folder = folder.parent


# -- S3 stores -----------------------------------------------------------------------


class S3Store(Store):
    """Objects under ``s3://bucket/prefix`` on AWS S3 or an S3-compatible endpoint."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        settings: S3Settings | None = None,
    ) -> None:
        settings = settings or S3Settings()
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.endpoint = endpoint_url or "AWS S3"  # for messages
        self._client = _s3_client(endpoint_url, region, settings)
        self._backoff = settings.backoff
        self._transfer = TransferConfig(
            multipart_threshold=settings.multipart_threshold,
            multipart_chunksize=settings.multipart_chunksize,
        )

    def _full(self, key: str) -> str:
        key = _clean_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _relative(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    def upload_file(self, local: Path, key: str) -> None:
        def upload() -> None:
            self._client.upload_file(
                str(local), self.bucket, self._full(key), Config=self._transfer
            )

        self._call("uploading", key, upload)

    def download_file(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)

        def download() -> None:
            try:
                self._client.download_file(
                    self.bucket, self._full(key), str(local), Config=self._transfer
                )
            except ClientError as error:
                if _status(error) != 404:
                    raise
                raise self._not_found(key) from None

        self._call("downloading", key, download)

    def put_bytes(self, key: str, data: bytes) -> None:
        def put() -> None:
            self._client.put_object(Bucket=self.bucket, Key=self._full(key), Body=data)

        self._call("writing", key, put)

    def get_bytes(self, key: str) -> bytes:
        def get() -> bytes:
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=self._full(key))
            except ClientError as error:
                if _status(error) != 404:
                    raise
                raise self._not_found(key) from None
            data: bytes = response["Body"].read()  # inside the retry: a body can break off
            return data

        return self._call("reading", key, get)

    def exists(self, key: str) -> bool:
        def head() -> bool:
            try:
                self._client.head_object(Bucket=self.bucket, Key=self._full(key))
            except ClientError as error:
                if _status(error) != 404:
                    raise
                self._not_found(key)  # raises ConfigInvalid if the bucket is missing
                return False
            return True

        return self._call("checking", key, head)

    def list(self, key_prefix: str = "") -> builtins.list[str]:
        return sorted(self._relative(key) for key in self._list_full(key_prefix))

    def list_details(self, key_prefix: str = "") -> builtins.list[ObjectInfo]:
        """The objects under ``key_prefix`` with their sizes and ETags, sorted by key (one
        LIST per 1000 keys, no GET: what the model cache checks a copy against)."""

        def list_all() -> builtins.list[ObjectInfo]:  # from the first page again on a retry
            found: builtins.list[ObjectInfo] = []
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._full(key_prefix)
            )
            for page in pages:
                found += [
                    ObjectInfo(
                        self._relative(item["Key"]),
                        int(item.get("Size", 0)),
                        str(item.get("ETag", "")).strip('"'),
                    )
                    for item in page.get("Contents", [])
                ]
            return sorted(found)

        return self._call("listing", key_prefix, list_all)

    def delete_prefix(self, key_prefix: str) -> None:
        keys = self._list_full(key_prefix)
        for start in range(0, len(keys), 1000):  # DeleteObjects takes up to 1000 keys
            batch = [{"Key": key} for key in keys[start : start + 1000]]

            def delete(batch: builtins.list[dict[str, str]] = batch) -> None:
                response = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
                for failure in response.get("Errors", [])[:1]:  # per-key failures, no status
                    code, where = failure.get("Code", ""), self._where("deleting", key_prefix)
                    raise _from_code(code, 0, where) or _unavailable(where, code)

            self._call("deleting", key_prefix, delete)

    def uri_for(self, key: str) -> str:
        full = self._full(key).rstrip("/") if key else self.prefix
        return f"s3://{self.bucket}/{full}" if full else f"s3://{self.bucket}"

    def _list_full(self, key_prefix: str) -> builtins.list[str]:
        def list_all() -> builtins.list[str]:  # from the first page again on a retry
            keys: builtins.list[str] = []
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._full(key_prefix)
            )
            for page in pages:
                keys.extend(item["Key"] for item in page.get("Contents", []))
            return keys

        return self._call("listing", key_prefix, list_all)

    def _not_found(self, key: str) -> FileNotFoundError:
        """The error for a missing key; raises ConfigInvalid if the bucket is missing."""
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as error:
            if _status(error) != 404:
                raise
            raise _missing_bucket(self._where("checking", "")) from None
        return FileNotFoundError(f"{self.uri_for(key)} does not exist")

    def _where(self, action: str, key: str) -> _Where:
        return _Where(action, self.uri_for(key), self.bucket, self.endpoint)

    def _call(self, action: str, key: str, call: Callable[[], T]) -> T:
        """``call()`` with boto errors turned into TrainerErrors (others pass through), and
        transient failures (StorageUnavailable) retried until the settings' patience is
        spent; each retry is logged once, at warning level."""
        where = self._where(action, key)

        def attempt() -> T:
            try:
                return call()
            except TrainerError:
                raise
            except Exception as error:
                translated = _translate(error, where)
                if translated is None:
                    raise
                raise translated from error

        def warn(error: BaseException, tries: int, wait: float, elapsed: float) -> None:
            log.warning(
                "%s; retrying in %.1f s (try %d failed, %.0f s of %.0f s spent)",
                error.message if isinstance(error, TrainerError) else error,
                wait,
                tries,
                elapsed,
                self._backoff.patience,
            )

        try:
            return call_with_retries(
                attempt, transient=StorageUnavailable, backoff=self._backoff, on_retry=warn
            )
        except RetriesExhausted as gave_up:
            raise _gave_up(gave_up, self._backoff.patience) from gave_up.last


def _s3_client(endpoint_url: str | None, region: str | None, settings: S3Settings) -> Any:
    """A boto3 S3 client; path-style addressing for custom (S3-compatible) endpoints."""
    options: dict[str, Any] = {}
    if endpoint_url:
        # S3-compatible stores: bucket in the path, and checksums only where S3 requires
        # them (boto3 >= 1.36 adds CRC32 trailers that some stores reject).
        options = {
            "s3": {"addressing_style": "path"},
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
        }
    config = Config(
        retries={"mode": "standard", "total_max_attempts": settings.max_attempts},
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        **options,
    )
    session = boto3.session.Session()
    try:  # botocore resolves the credentials here: an empty or missing half fails at once
        return session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
    except PartialCredentialsError as error:  # names the variable, never a value
        raise CredentialsInvalid(
            f"incomplete S3 credentials for {endpoint_url or 'AWS S3'}: {error}",
            hint="set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, neither empty (the "
            "storage Secret needs both keys)",
        ) from None


# -- error classification ------------------------------------------------------------


@dataclass(frozen=True)
class _Where:
    """What was being done when an S3 call failed, for the error message."""

    action: str
    uri: str
    bucket: str
    endpoint: str


def _status(error: ClientError) -> int:
    status: int = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return status


def _unwrap(error: BaseException) -> BaseException:
    """The botocore error inside boto3's transfer wrappers (they drop its type)."""
    inner: BaseException | None = None
    if isinstance(error, S3UploadFailedError):
        inner = error.__context__  # raised while handling the ClientError
    elif isinstance(error, RetriesExceededError):
        inner = error.last_exception
    return inner if inner is not None else error


def _translate(error: BaseException, where: _Where) -> TrainerError | None:
    """The TrainerError for a boto error, or None for errors this module does not know."""
    error = _unwrap(error)
    if isinstance(error, NoCredentialsError | PartialCredentialsError):
        return CredentialsInvalid(
            f"no S3 credentials found for bucket {where.bucket!r} at {where.endpoint}",
            hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (from the storage Secret)",
        )
    if isinstance(error, BotoConnectionError | HTTPClientError | IncompleteReadError):
        return _unavailable(where, type(error).__name__)  # incl. a body cut off mid-read
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        return _from_code(code, _status(error), where)
    return None


def _from_code(code: str, status: int, where: _Where) -> TrainerError | None:
    """The TrainerError for an S3 error code / HTTP status, or None if unknown."""
    if code in _CREDENTIAL_CODES or status == 403:
        return CredentialsInvalid(
            f"S3 at {where.endpoint} denied {where.action} {where.uri} ({code or status})",
            hint=(
                "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the storage Secret, and "
                f"that this key may read and write bucket {where.bucket!r}"
            ),
        )
    if code in _BUCKET_CODES:
        return _missing_bucket(where)
    if status >= 500 or code in _UNAVAILABLE_CODES:
        return _unavailable(where, f"{code or 'HTTP'} {status}")
    if 400 <= status < 500 and (not code or code.isdigit()):
        # A 4xx without an S3 error code: most often a web server or proxy, not an S3 API.
        return ConfigInvalid(
            f"{where.endpoint} answered {where.action} {where.uri} with HTTP {status} and no "
            "S3 error code: a web server or proxy rather than an S3 API, or a request the "
            "store rejects without saying why (such as a wrong region)",
            hint="check spec.output.endpoint (the S3 API's URL, e.g. http://seaweedfs:8333), "
            "spec.output.region and the bucket name",
        )
    return None


def _missing_bucket(where: _Where) -> ConfigInvalid:
    return ConfigInvalid(
        f"S3 bucket {where.bucket!r} does not exist at {where.endpoint} (or its name is invalid)",
        hint="create the bucket, or fix the bucket name (or endpoint) in the job",
    )


def _unavailable(where: _Where, detail: str) -> StorageUnavailable:
    """A transient failure of one try (retried by ``S3Store._call``)."""
    return StorageUnavailable(
        f"S3 at {where.endpoint} failed {where.action} {where.uri} ({detail})"
    )


def _gave_up(gave_up: RetriesExhausted, patience: float) -> StorageUnavailable:
    """The error once transient failures outlasted the patience."""
    last = gave_up.last
    message = last.message if isinstance(last, TrainerError) else str(last)
    return StorageUnavailable(
        f"{message}; gave up after {gave_up.tries} tries over {gave_up.elapsed:.0f} s",
        hint=(
            "the endpoint stayed unreachable, overloaded or failing for longer than "
            f"spec.output.retryTimeoutSeconds ({patience:g} s); the job is retried from its "
            "last complete checkpoint. Check the storage service, or raise "
            "retryTimeoutSeconds to ride out longer outages"
        ),
    )


# -- keys and URIs -------------------------------------------------------------------


def _clean_key(key: str) -> str:
    """``key`` if it stays under the store's root (no leading "/", "." or ".." parts)."""
    parts = key.split("/")
    inner, last = parts[:-1], parts[-1]
    if key.startswith("/") or any(p in ("", ".", "..") for p in inner) or last in (".", ".."):
        raise ValueError(f"invalid storage key {key!r}")
    return key


def _as_folder(key_prefix: str) -> str:
    """``key_prefix`` as a folder prefix: "" stays "", others end with one "/"."""
    return key_prefix.rstrip("/") + "/" if key_prefix.strip("/") else ""


def _split_uri(uri: str) -> tuple[str, str, str]:
    """(scheme, bucket, key or path): ("s3", bucket, key) or ("file", "", local path)."""
    if uri.startswith("s3://"):
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        if not bucket:
            raise ConfigInvalid(f"{uri!r} names no bucket", hint="write s3://bucket/prefix")
        try:
            _clean_key(key.lstrip("/"))
        except ValueError:
            raise ConfigInvalid(
                f"{uri!r} is not a valid S3 URI", hint="write s3://bucket/prefix"
            ) from None
        return "s3", bucket, key.lstrip("/")
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise ConfigInvalid(f"{uri!r} is not a local file URI", hint="write file:///abs/dir")
        return "file", "", unquote(parsed.path)
    if _SCHEME.match(uri):
        raise ConfigInvalid(
            f"unsupported storage URI {uri!r}",
            hint="use s3://bucket/prefix, file:///abs/dir or a local path",
        )
    return "file", "", uri
