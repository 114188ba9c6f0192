"""Where bytes live: a local folder or an object store, behind one small interface.

Every location is opened through `pyarrow.fs`, so local paths, `file://`, `s3://` (AWS and
S3-compatible stores) and `gs://` share one code path. Writes are whole-buffer and verified:
object stores publish an upload even when the writer fails half-way, so a write is only
trusted once the stored size equals the buffer's size.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import parse_qs, unquote, urlencode, urlparse

import pyarrow.fs as pafs

from cogdist.errors import StorageError

T = TypeVar("T")
log = logging.getLogger(__name__)
TEMP_SUFFIX = ".tmp"
RETRY_SECONDS = 300.0
"""How long a read or write keeps being retried through transient errors (an object store that
is restarting or unreachable) before it fails; see `--storage-timeout`."""
MAX_DELAY = 15.0

# Query parameters of an s3:// URI that pyarrow's S3FileSystem accepts as strings.
_S3_QUERY_OPTIONS = {"endpoint_override", "scheme", "region", "role_arn", "session_name", "external_id"}
_SECRET_QUERY = re.compile(r"(secret|token|key|password|credential)", re.IGNORECASE)


def redact(uri: str) -> str:
    """`uri` without credentials: user info and secret-looking query values are masked."""
    if "://" not in uri:
        return uri
    parsed = urlparse(uri)
    netloc = parsed.netloc
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    elif ":" in netloc and "@" in uri.partition("://")[2]:
        # User info whose secret holds an unescaped "/", "?" or "#", which ended the host early.
        return f"{parsed.scheme}://***@{uri.rsplit('@', 1)[1]}"
    query = parsed.query
    if query:
        parts = []
        for item in query.split("&"):
            name, _, value = item.partition("=")
            parts.append(f"{name}=***" if _SECRET_QUERY.search(name) else item)
        query = "&".join(parts)
    return parsed._replace(netloc=netloc, query=query).geturl()


def _endpoint_from_env() -> dict[str, str]:
    """The usual AWS endpoint variables, as S3FileSystem options (pyarrow does not read them)."""
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not url:
        return {}
    parsed = urlparse(url if "://" in url else f"https://{url}")
    return {"endpoint_override": parsed.netloc, "scheme": parsed.scheme or "https"}


def _open_s3(uri: str) -> tuple[pafs.FileSystem, pafs.FileSystem, str, str, str]:
    """The file system for reads, the one for writes, the root, the public and the portable URI."""
    parsed = urlparse(uri)
    if ":" in parsed.netloc.rsplit("@", 1)[-1]:
        # A bucket name holds no ":": this is user info whose secret holds an unescaped "/", "?"
        # or "#", which ended the host early, so that the rest of the secret reads as the key.
        raise StorageError(
            "the credentials of an s3:// URI must be percent-encoded ('/' as %2F, '?' as %3F, '#' "
            "as %23); better, give them as AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        )
    if not parsed.hostname:
        raise StorageError(f"{redact(uri)}: an s3:// URI needs a bucket, as in s3://bucket/prefix")
    options: dict[str, object] = _endpoint_from_env()
    query = parse_qs(parsed.query)
    portable = uri
    if options and "endpoint_override" not in query:
        # Workers may run where this environment variable is not set: name the endpoint.
        portable = parsed._replace(
            query=urlencode({**{k: v[-1] for k, v in query.items()}, **options})
        ).geturl()
    for name, values in query.items():
        if name not in _S3_QUERY_OPTIONS:
            raise StorageError(
                f"{redact(uri)}: unknown query option {name!r}; accepted: {', '.join(sorted(_S3_QUERY_OPTIONS))}"
            )
        options[name] = values[-1]
    if parsed.username:
        options["access_key"] = unquote(parsed.username)
        options["secret_key"] = unquote(parsed.password or "")
    fs = pafs.S3FileSystem(**options)
    # Writes only: a delayed open does not ask the store whether the path is a directory first
    # (two round trips fewer per write; a refused write still fails when its stream closes).
    # Reads keep the prompt open, whose FileNotFoundError tells a deleted part from a refused one.
    writes = pafs.S3FileSystem(**options, allow_delayed_open=True)
    bucket = parsed.netloc.rsplit("@", 1)[-1]
    root = f"{bucket}/{parsed.path.strip('/')}".rstrip("/")
    return fs, writes, root, f"s3://{root}", portable


@dataclass(frozen=True)
class Location:
    """A folder in some file system; paths given to its methods are relative to it."""

    uri: str  # as given by the user; may hold credentials, so never print it
    public_uri: str  # without credentials or query: safe for logs, errors and the index
    fs: pafs.FileSystem
    root: str  # the folder inside `fs`
    worker_uri: str = ""  # what a worker elsewhere opens to reach the same place (endpoint explicit)
    retry_seconds: float = RETRY_SECONDS
    writes_fs: pafs.FileSystem | None = None  # opens write_bytes's streams (default: `fs`)

    def __post_init__(self) -> None:
        if not self.worker_uri:
            object.__setattr__(self, "worker_uri", self.uri)
        if self.writes_fs is None:
            object.__setattr__(self, "writes_fs", self.fs)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, rel: str = "") -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def uri_of(self, rel: str) -> str:
        """Where `rel` can be found, in a form that is safe to record (no credentials)."""
        return f"{self.public_uri}/{rel}"

    # -- reading ---------------------------------------------------------------------------

    def exists(self, rel: str) -> bool:
        info = _retry(
            lambda: self.fs.get_file_info(self.path(rel)), self.retry_seconds, f"reach {self.uri_of(rel)}"
        )
        return info.type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        """The whole file at `rel`, retrying transient errors for up to `retry_seconds`."""

        def read() -> bytes:
            try:
                with self.fs.open_input_stream(self.path(rel)) as stream:
                    return stream.readall()
            except FileNotFoundError as e:
                raise StorageError(f"{self.uri_of(rel)} does not exist") from e

        return _retry(read, self.retry_seconds, f"read {self.uri_of(rel)}")

    def list_files(self, rel: str, suffix: str = "") -> list[pafs.FileInfo]:
        """Files directly under `rel` ending in `suffix`, sorted; hidden ('.', '_') names skipped."""
        selector = pafs.FileSelector(self.path(rel), recursive=False, allow_not_found=True)
        listing = _retry(
            lambda: self.fs.get_file_info(selector), self.retry_seconds, f"list {self.uri_of(rel)}"
        )
        infos = [
            info
            for info in listing
            if info.type == pafs.FileType.File
            and info.path.endswith(suffix)
            and not info.base_name.startswith((".", "_"))
        ]
        return sorted(infos, key=lambda info: info.path)

    # -- writing ---------------------------------------------------------------------------

    def write_bytes(self, rel: str, data: bytes, *, durable: bool = False) -> None:
        """Store `data` at `rel` completely or not at all, retrying transient errors for up to
        `retry_seconds` (StorageError after that).

        Local files are written beside the target and renamed over it, so a reader never sees
        a partial file. Object stores publish only finished uploads, but also publish one that
        failed half-way; the stored size is therefore checked, and a short object is deleted.
        """
        path = self.path(rel)
        if self.is_local:
            _retry(lambda: _write_local_atomic(path, data, durable), self.retry_seconds, f"write {path}")
            return

        def put() -> None:
            stream = self.writes_fs.open_output_stream(path)
            stream.write(data)
            stream.close()
            size = self.fs.get_file_info(path).size
            if size != len(data):
                self.fs.delete_file(path)
                raise OSError(f"stored {size} of {len(data)} bytes")

        _retry(put, self.retry_seconds, f"write {self.uri_of(rel)}")

    def delete(self, rel: str) -> None:
        """Remove the file at `rel` if it exists (retrying transient errors)."""

        def delete() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.delete_file(self.path(rel))

        _retry(delete, self.retry_seconds, f"delete {self.uri_of(rel)}")

    def sweep_temporary(self, rel: str) -> int:
        """Remove temporary files that killed writers left directly under `rel` (local only)."""
        if not self.is_local:
            return 0  # object stores never show an unfinished upload
        selector = pafs.FileSelector(self.path(rel), recursive=False, allow_not_found=True)
        stale = [
            info.path
            for info in self.fs.get_file_info(selector)
            if info.base_name.startswith(".") and info.base_name.endswith(TEMP_SUFFIX)
        ]
        for path in stale:
            self.fs.delete_file(path)
        return len(stale)

    def delete_tree(self, rel: str) -> None:
        path = self.path(rel)
        if self.fs.get_file_info(path).type == pafs.FileType.Directory:
            self.fs.delete_dir(path)


def _write_local_atomic(path: str, data: bytes, durable: bool) -> None:
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    # A fixed temporary name: the next attempt at the same output replaces a killed one's leftover.
    tmp = os.path.join(folder, f".{name}{TEMP_SUFFIX}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _retry(fn: Callable[[], T], seconds: float, what: str, first_delay: float = 0.5) -> T:
    """`fn()`, called again after OSErrors with doubling delays (at most MAX_DELAY) until `seconds`
    have passed; a missing file or a refused permission is final at once."""
    start = time.monotonic()
    delay = first_delay
    for attempt in itertools.count(1):
        try:
            return fn()
        except OSError as e:
            elapsed = time.monotonic() - start
            if elapsed + delay > seconds or isinstance(e, (FileNotFoundError, PermissionError)):
                raise StorageError(
                    f"could not {what} after {attempt} attempt(s) over {elapsed:.0f}s: {_redact_error(e)}"
                ) from e
            if attempt == 1:
                log.warning("%s failed (%s); retrying for up to %.0fs", what, _redact_error(e), seconds)
            time.sleep(delay)
            delay = min(delay * 2, MAX_DELAY)
    raise AssertionError("unreachable")


def _redact_error(error: BaseException) -> str:
    """An OS error's text with any URI in it redacted (pyarrow quotes the failing path)."""
    return re.sub(r"[a-z][a-z0-9+.-]*://\S+", lambda m: redact(m.group(0)), str(error))


def open_location(uri: str, retry_seconds: float = RETRY_SECONDS) -> Location:
    """Open a local path, `file://`, `s3://` or `gs://` URI (or any scheme pyarrow.fs knows)."""
    if "://" not in uri:
        root = os.path.abspath(os.path.expanduser(uri))
        return Location(uri, root, pafs.LocalFileSystem(), root, retry_seconds=retry_seconds)
    scheme = urlparse(uri).scheme.lower()
    if scheme == "file":
        root = os.path.abspath(unquote(urlparse(uri).path))
        return Location(uri, root, pafs.LocalFileSystem(), root, retry_seconds=retry_seconds)
    if scheme in ("s3", "s3a"):
        fs, writes, root, public, portable = _open_s3(uri)
        return Location(uri, public, fs, root, portable, retry_seconds, writes)
    try:
        fs, root = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        reason = str(e).replace(uri, redact(uri))  # pyarrow may quote the URI, credentials and all
        raise StorageError(
            f"cannot open {redact(uri)}: {reason}. Supported: local paths, file://, s3://, gs://"
        ) from None
    root = root.rstrip("/")
    return Location(uri, f"{scheme}://{root}", fs, root, retry_seconds=retry_seconds)


def input_uri(uri: str) -> str:
    """A manifest's input URI in a form any worker can open: local paths made absolute (against
    the driver's working directory), an S3-compatible endpoint named explicitly."""
    return open_location(uri).worker_uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def read_uri(uri: str, retry_seconds: float = RETRY_SECONDS) -> bytes:
    """The whole object or file at `uri`, or StorageError saying which and why (redacted)."""
    try:
        location = open_location(uri, retry_seconds)
        info = _retry(
            lambda: location.fs.get_file_info(location.root), retry_seconds, f"open {location.public_uri}"
        )
        if info.type == pafs.FileType.NotFound:
            raise StorageError(f"{location.public_uri} does not exist")
        if info.type != pafs.FileType.File:
            raise StorageError(f"{location.public_uri} is not a file")
        return location.read_bytes("")
    except StorageError:
        raise
    except (OSError, ValueError) as e:
        raise StorageError(f"cannot read {redact(uri)}: {e}") from e
