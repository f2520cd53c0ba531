"""Where files live: a local path, or any fsspec URL (``s3://``, ``gs://``, ``file://``, ...).

``Location`` is the one type the engine, the sources and the loaders use for paths. Local paths
(and ``file://`` URLs) go straight to ``os`` and memory maps, so nothing changes for them;
other URLs go through fsspec, imported only then (``pip install 'dlpipe[s3]'`` or ``[gcs]``).

Credentials and endpoints come from where the filesystem looks for them (the environment,
``~/.aws``, instance metadata) or from ``storage_options`` (as in HF ``datasets``), which on
the CLI are ``--storage-option key=value``. A Location never prints its options: its repr and
every error show the URL only.

Transient faults of remote storage (HTTP 500/502/503/504/429/408 answers such as S3's 503
SlowDown, connections refused or reset, bodies cut short, requests that stall past the timeout)
are retried (``dlpipe.retry.retried``), per Location call, with bounded exponential backoff and full jitter; a range
read that returns fewer bytes than asked counts as a fault too. Anything else (403, 404, bad
credentials, invalid requests) fails at once. After the last attempt the call raises one
``StorageError`` naming the object URL, the number of attempts and the last cause.

The policy (``RetryPolicy``) defaults to 8 attempts, a wait after failure n drawn from
[0, min(5 s, 0.05 s * 2**(n-1))] (at most 6.35 s of waiting per call in all) and a 15 s timeout
for connecting or for the next bytes of an answer. It comes from, in increasing precedence: the
defaults, ``DLPIPE_RETRY_ATTEMPTS``, ``DLPIPE_RETRY_BASE_DELAY``, ``DLPIPE_RETRY_MAX_DELAY``,
``DLPIPE_RETRY_TIMEOUT``, and the storage option ``dlpipe_retry`` (a dict, or
``"attempts=3,timeout=5"``; on the CLI ``--storage-option dlpipe_retry.attempts=3``). For
``s3://`` the layers below are made to try once (s3fs's own retry loop, botocore's retries), so
that this policy is the one that counts; ``config_kwargs`` given in the storage options
(``retries``, ``connect_timeout``, ``read_timeout``) still win over what dlpipe sets there.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

from dlpipe.errors import ConfigError, MissingDependencyError, StorageError
from dlpipe.local_dirs import default_cache_dir, file_lock
from dlpipe.retry import RETRY_OPTION, RetryPolicy, _ShortRead, retried

__all__ = ["Location", "RetryPolicy", "StorageError", "is_remote", "parse_storage_options"]


# protocol -> pip extra that brings its fsspec implementation
_EXTRA = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


def is_remote(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a URL that fsspec serves (anything with ``scheme://`` but ``file://``)."""
    text = os.fspath(path)
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.isidentifier() and scheme != "file"


def _strip_file(path: str) -> str:
    return path[len("file://"):] if path.startswith("file://") else path


def parse_storage_options(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``key=value`` strings as storage_options; values are JSON when they parse as JSON
    (``true``, ``3``), else strings; a dotted key nests (``client_kwargs.region_name=eu-west-1``)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--storage-option {key or pair!r}: expected key=value")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--storage-option {key}: {p} is given both as a value and as a group")
        node[last] = value
    return out


class Location:
    """A file or directory, local or remote. Picklable: the fsspec filesystem is created on first
    use in each process (worker processes and Ray tasks get their own connections)."""

    def __init__(self, path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None):
        text = os.fspath(path)
        self.remote = is_remote(text)
        self.url = text.rstrip("/") if self.remote else _strip_file(text)
        self.storage_options = dict(storage_options or {})
        self._fs = None
        self._fs_pid = 0
        self._fs_path: str | None = None
        self._retry: RetryPolicy | None = None

    # -- identity ------------------------------------------------------------------------------

    def __repr__(self) -> str:  # never the options: they may hold secrets
        return f"Location({self.url!r})"

    def __str__(self) -> str:
        return self.url

    def __fspath__(self) -> str:
        if self.remote:
            raise TypeError(f"{self.url} is not a local path")
        return self.url

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fs": None, "_retry": None}

    def join(self, *names: str) -> Location:
        """A place below this one; a name that is itself a URL (a mixture's shard from another
        dataset, ``loaders.mixture``) stands for itself, as an absolute local path does."""
        urls = [i for i, n in enumerate(names) if is_remote(n)]
        if urls:
            joined = posixpath.join(names[urls[-1]], *names[urls[-1] + 1 :])
        else:
            joined = posixpath.join(self.url, *names) if self.remote else os.path.join(self.url, *names)
        child = Location.__new__(Location)
        child.__dict__.update(self.__getstate__())
        child.url = joined
        child._fs_path = None
        return child

    @property
    def name(self) -> str:
        return posixpath.basename(self.url) if self.remote else os.path.basename(self.url)

    # -- the filesystem ------------------------------------------------------------------------

    @property
    def fs(self):
        if self._fs is None or self._fs_pid != os.getpid():  # a forked child inherits the parent's
            self._fs_pid = os.getpid()
            try:
                import fsspec  # noqa: F401
            except ImportError:
                raise MissingDependencyError(
                    f"{self.url} needs fsspec, which is not installed; run: pip install 'dlpipe[s3]'") from None
            protocol = self.url.split("://", 1)[0]
            try:
                self._fs = _filesystem(protocol, self.storage_options, self.retry_policy)
            except ImportError:
                extra = _EXTRA.get(protocol)
                cmd = f"pip install 'dlpipe[{extra}]'" if extra else f"pip install the fsspec backend for {protocol}://"
                raise MissingDependencyError(f"{self.url} needs the fsspec filesystem for {protocol}://; run: {cmd}") \
                    from None
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{self.url}: bad storage options ({type(e).__name__}); check --storage-option "
                                  "names against the filesystem's documentation") from None
        return self._fs

    @property
    def retry_policy(self) -> RetryPolicy:
        """How this location's remote calls are retried (see the module docstring)."""
        if self._retry is None:
            self._retry = RetryPolicy.resolve(self.storage_options.get(RETRY_OPTION))
        return self._retry

    @property
    def fs_path(self) -> str:
        if self._fs_path is None:
            fs = self.fs
            self._fs_path = fs._strip_protocol(self.url)
        return self._fs_path

    # -- queries -------------------------------------------------------------------------------

    @retried("existence check")
    def exists(self) -> bool:
        return self.fs.exists(self.fs_path) if self.remote else os.path.exists(self.url)

    @retried("lookup")
    def isfile(self) -> bool:
        if not self.remote:
            return os.path.isfile(self.url)
        try:  # not fs.isfile: fsspec's answers False for any error, a 503 included
            return self.fs.info(self.fs_path)["type"] == "file"
        except FileNotFoundError:
            return False

    @retried("lookup")
    def isdir(self) -> bool:
        return self.fs.isdir(self.fs_path) if self.remote else os.path.isdir(self.url)

    @retried("size lookup")
    def size(self) -> int:
        return int(self.fs.size(self.fs_path)) if self.remote else os.path.getsize(self.url)

    @retried("listing")
    def listdir(self) -> list[str]:
        """Names directly under this directory ([] when there is nothing)."""
        if not self.remote:
            return os.listdir(self.url) if os.path.isdir(self.url) else []
        self.fs.invalidate_cache(self.fs_path)  # other processes write here
        try:
            entries = self.fs.ls(self.fs_path, detail=False)
        except FileNotFoundError:
            return []
        base = self.fs_path.rstrip("/") + "/"
        return sorted({e[len(base):].split("/", 1)[0] for e in entries if e.startswith(base) and len(e) > len(base)})

    @retried("listing")
    def file_sizes(self) -> dict[str, int]:
        """{name: size} of the files directly under this directory (one listing request remotely)."""
        if not self.remote:
            if not os.path.isdir(self.url):
                return {}
            with os.scandir(self.url) as it:
                return {e.name: e.stat().st_size for e in it if e.is_file()}
        self.fs.invalidate_cache(self.fs_path)
        try:
            entries = self.fs.ls(self.fs_path, detail=True)
        except FileNotFoundError:
            return {}
        return {posixpath.basename(e["name"].rstrip("/")): int(e.get("size") or 0)
                for e in entries if e.get("type") == "file"}

    @retried("listing")
    def walk_files(self) -> list[Location]:
        """Every file under this directory, or this file."""
        if not self.remote:
            if os.path.isdir(self.url):
                return [Location(os.path.join(r, f)) for r, _, fs in os.walk(self.url) for f in sorted(fs)]
            return [self]
        fs = self.fs
        if fs.isdir(self.fs_path):
            prefix = self.url.split("://", 1)[0] + "://"
            return [Location(prefix + p, self.storage_options) for p in sorted(fs.find(self.fs_path))]
        return [self]

    @retried("lookup")
    def identity(self) -> str:
        """What changes when the file changes: size and mtime locally, size and ETag (or mtime)
        remotely. Used in fingerprints; holds no credentials."""
        if not self.remote:
            st = os.stat(self.url)
            return f"{os.path.abspath(self.url)}\0{st.st_size}\0{st.st_mtime_ns}"
        info = self.fs.info(self.fs_path)
        tag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("LastModified") or info.get("mtime")
        return f"{self.url}\0{info.get('size')}\0{tag}"

    # -- reading -------------------------------------------------------------------------------

    @retried("read")
    def read_bytes(self, start: int | None = None, end: int | None = None) -> bytes:
        """The whole file, or bytes ``[start, end)`` (one range request when remote). A remote
        range that comes back shorter than asked, while the object holds those bytes, is a
        transient fault: retried, never handed on."""
        if self.remote:
            data = self.fs.cat_file(self.fs_path, start=start, end=end)
            if start is not None and end is not None and 0 <= start <= end and len(data) != end - start:
                self.fs.invalidate_cache(self.fs_path)
                expected = max(0, min(end, int(self.fs.size(self.fs_path))) - start)
                if len(data) != expected:
                    raise _ShortRead(errno.EIO, f"got {len(data)} of {expected} bytes")
            return data
        with open(self.url, "rb") as f:
            if start:
                f.seek(start)
            return f.read() if end is None else f.read(end - (start or 0))

    def open(self, mode: str = "rb", **kwargs):
        return self.fs.open(self.fs_path, mode, **kwargs) if self.remote else open(self.url, mode)

    # -- writing -------------------------------------------------------------------------------

    def makedirs(self) -> None:
        if not self.remote:
            os.makedirs(self.url, exist_ok=True)
        # object stores have no directories: keys appear with their first object

    @retried("write")
    def write_bytes(self, data: bytes) -> None:
        """Write the whole file atomically: a single PUT remotely, tmp + fsync + rename locally."""
        if self.remote:
            self.fs.pipe_file(self.fs_path, data)
            return
        head, tail = os.path.split(self.url)
        tmp = os.path.join(head, f".{tail}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.url)

    @retried("upload")
    def put_file(self, local: str) -> None:
        """Upload (or move) a finished local file to this location. An object appears under its
        key only when the upload completes, so a reader never sees part of it."""
        if self.remote:
            self.fs.put_file(local, self.fs_path)
            os.remove(local)
        else:
            os.replace(local, self.url)

    @retried("delete")
    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.remote:
                self.fs.rm_file(self.fs_path)
            else:
                os.remove(self.url)

    @retried("delete")
    def remove_tree(self) -> None:
        if self.remote:
            with contextlib.suppress(FileNotFoundError):
                if self.fs.exists(self.fs_path):
                    self.fs.rm(self.fs_path, recursive=True)
            self.fs.invalidate_cache(self.fs_path)
        else:
            shutil.rmtree(self.url, ignore_errors=True)

    def local_copy(self, cache_dir: str | None = None) -> str:
        """A local path with this file's (or directory's) bytes: the path itself when local, else
        a copy under ``cache_dir`` (default ``$DLPIPE_CACHE_DIR`` or ``~/.cache/dlpipe``) named
        by the object's identity, so a changed object is fetched again and an unchanged one is not."""
        if not self.remote:
            return self.url
        files = self.walk_files()
        key = hashlib.sha256("\n".join(f.identity() for f in files).encode()).hexdigest()[:24]
        root = os.path.join(cache_dir or default_cache_dir(), "objects", key)
        target = os.path.join(root, self.name)
        if os.path.exists(target):
            return target
        os.makedirs(root, exist_ok=True)
        with file_lock(target + ".lock"):  # the other processes on this machine wait for one download
            if not os.path.exists(target):
                self._download(files, root, target)
        return target

    @retried("download")
    def _get_file(self, dest: str) -> None:
        self.fs.get_file(self.fs_path, dest)  # rewrites dest from its start on every attempt

    def _download(self, files: list[Location], root: str, target: str) -> None:
        staging = tempfile.mkdtemp(prefix=".fetch-", dir=root)
        try:
            dest = os.path.join(staging, self.name)
            if len(files) == 1 and files[0].url == self.url:
                self._get_file(dest)
            else:
                base = self.fs_path.rstrip("/") + "/"
                for f in files:
                    rel = f.fs_path[len(base):]
                    os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
                    f._get_file(os.path.join(dest, rel))
            os.replace(dest, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


_FILESYSTEMS: dict[tuple, Any] = {}


def _filesystem(protocol: str, options: Mapping[str, Any], policy: RetryPolicy):
    """One filesystem per (process, protocol, options, timeout). fsspec's own instance cache
    would hand a forked worker its parent's instance, whose event loop does not survive the fork.

    For S3 the retries below dlpipe's are turned off, so that a fault costs one request and
    ``policy`` alone decides what happens next: botocore tries once (``config_kwargs.retries``)
    and s3fs's own loop (its ``retries`` attribute, 5 by default) once; botocore's connect and
    read timeouts are ``policy.timeout``. What the caller put in ``config_kwargs`` wins."""
    import fsspec

    key = (os.getpid(), protocol, json.dumps(options, sort_keys=True, default=str), policy.timeout)
    fs = _FILESYSTEMS.get(key)
    if fs is None:
        kwargs = {k: v for k, v in options.items() if k != RETRY_OPTION}
        s3 = protocol in ("s3", "s3a")
        if s3:
            kwargs["config_kwargs"] = {"retries": {"total_max_attempts": 1}, "connect_timeout": policy.timeout,
                                       "read_timeout": policy.timeout, **(kwargs.get("config_kwargs") or {})}
        fs = fsspec.filesystem(protocol, skip_instance_cache=True, **kwargs)
        if s3:
            if hasattr(fs, "retries"):
                fs.retries = 1
            _reuse_service_data(fs)
        _FILESYSTEMS[key] = fs
    return fs


def _reuse_service_data(fs) -> None:
    """Let a new S3 filesystem's botocore session share the service descriptions an inherited
    one has parsed (a forked DataLoader worker holds its parent's): making a client parses about
    1 MB of JSON otherwise, ~0.2 s of CPU in each worker, on the cores that read and decode.
    The session is made as s3fs makes it; only its data loader (parsed files, nothing that
    connects or holds credentials) is the inherited one."""
    if getattr(fs, "session", False) is not None or not isinstance(getattr(fs, "kwargs", None), dict):
        return
    loader = next((f.session.get_component("data_loader") for f in _FILESYSTEMS.values()
                   if getattr(f, "session", None) is not None), None)
    if loader is not None:
        from aiobotocore.session import AioSession

        fs.session = AioSession(**fs.kwargs)
        fs.session.register_component("data_loader", loader)
