"""Where files live: a local path, or any fsspec URL (``s3://``, ``gs://``, ``file://``, ...).

``Location`` is the one type the engine, the sources and the loaders use for paths. Local paths
(and ``file://`` URLs) go straight to ``os`` and memory maps, so nothing changes for them;
other URLs go through fsspec, imported only then (``pip install 'dlpipe[s3]'`` or ``[gcs]``).

Credentials and endpoints come from where the filesystem looks for them (the environment,
``~/.aws``, instance metadata) or from ``storage_options`` (as in HF ``datasets``), which on
the CLI are ``--storage-option key=value``. A Location never prints its options: its repr and
every error show the URL only.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

from dlpipe.errors import ConfigError, DlpipeError, MissingDependencyError

__all__ = ["Location", "is_remote", "parse_storage_options"]

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


def _io(method):
    """Failures of a remote filesystem call surface as OSError, as local ones do: callers turn
    OSError into one-line errors, and botocore, gcsfs and aiohttp raise their own types."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (OSError, DlpipeError):
            raise
        except Exception as e:
            if not self.remote:
                raise
            raise OSError(errno.EIO, f"{type(e).__name__}: {e}") from e

    return wrapper


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
        return {**self.__dict__, "_fs": None}

    def join(self, *names: str) -> Location:
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
                self._fs = _filesystem(protocol, self.storage_options)
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
    def fs_path(self) -> str:
        if self._fs_path is None:
            fs = self.fs
            self._fs_path = fs._strip_protocol(self.url)
        return self._fs_path

    # -- queries -------------------------------------------------------------------------------

    @_io
    def exists(self) -> bool:
        return self.fs.exists(self.fs_path) if self.remote else os.path.exists(self.url)

    @_io
    def isfile(self) -> bool:
        return self.fs.isfile(self.fs_path) if self.remote else os.path.isfile(self.url)

    @_io
    def isdir(self) -> bool:
        return self.fs.isdir(self.fs_path) if self.remote else os.path.isdir(self.url)

    @_io
    def size(self) -> int:
        return int(self.fs.size(self.fs_path)) if self.remote else os.path.getsize(self.url)

    @_io
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

    @_io
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

    @_io
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

    @_io
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

    @_io
    def read_bytes(self, start: int | None = None, end: int | None = None) -> bytes:
        """The whole file, or bytes ``[start, end)`` (one range request when remote)."""
        if self.remote:
            return self.fs.cat_file(self.fs_path, start=start, end=end)
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

    @_io
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

    @_io
    def put_file(self, local: str) -> None:
        """Upload (or move) a finished local file to this location. An object appears under its
        key only when the upload completes, so a reader never sees part of it."""
        if self.remote:
            self.fs.put_file(local, self.fs_path)
            os.remove(local)
        else:
            os.replace(local, self.url)

    @_io
    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.remote:
                self.fs.rm_file(self.fs_path)
            else:
                os.remove(self.url)

    @_io
    def remove_tree(self) -> None:
        if self.remote:
            with contextlib.suppress(FileNotFoundError):
                if self.fs.exists(self.fs_path):
                    self.fs.rm(self.fs_path, recursive=True)
            self.fs.invalidate_cache(self.fs_path)
        else:
            shutil.rmtree(self.url, ignore_errors=True)

    @_io
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

    def _download(self, files: list[Location], root: str, target: str) -> None:
        staging = tempfile.mkdtemp(prefix=".fetch-", dir=root)
        try:
            dest = os.path.join(staging, self.name)
            if len(files) == 1 and files[0].url == self.url:
                self.fs.get_file(self.fs_path, dest)
            else:
                base = self.fs_path.rstrip("/") + "/"
                for f in files:
                    rel = f.fs_path[len(base):]
                    os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
                    f.fs.get_file(f.fs_path, os.path.join(dest, rel))
            os.replace(dest, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


_FILESYSTEMS: dict[tuple[int, str, str], Any] = {}


def _filesystem(protocol: str, options: Mapping[str, Any]):
    """One filesystem per (process, protocol, options). fsspec's own instance cache would hand a
    forked worker its parent's instance, whose event loop does not survive the fork."""
    import fsspec

    key = (os.getpid(), protocol, json.dumps(options, sort_keys=True, default=str))
    fs = _FILESYSTEMS.get(key)
    if fs is None:
        fs = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
        _FILESYSTEMS[key] = fs
    return fs


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """An exclusive advisory lock between processes on this machine (one download of a file)."""
    try:
        import fcntl
    except ImportError:  # no advisory locks: processes may download the same file twice
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            # gone before it is unlocked: a later process finds the target, or (after a failed
            # download) locks a new file and tries again; a waiter on this one then may too
            with contextlib.suppress(OSError):
                os.remove(path)
            fcntl.flock(f, fcntl.LOCK_UN)


def default_cache_dir() -> str:
    return os.environ.get("DLPIPE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "dlpipe")


@contextlib.contextmanager
def staging_dir() -> Iterator[str]:
    """A private local directory for files on their way to object storage (``$DLPIPE_STAGING_DIR``
    or the system temp directory)."""
    base = os.environ.get("DLPIPE_STAGING_DIR")
    if base:
        os.makedirs(base, exist_ok=True)
    path = tempfile.mkdtemp(prefix="dlpipe-", dir=base)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
