"""Retrying remote storage calls: which faults are transient, how long to wait, and the policy
a user sets (``RetryPolicy``: attempts, exponential backoff with full jitter, a timeout).

Every remote call of ``dlpipe.storage.Location`` goes through this (local paths never do); the
last failure is a ``StorageError`` naming the object. Throttling (503 SlowDown, 429), server
errors, resets, short bodies and timeouts are retried; missing objects, refused access and TLS
errors are not.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from dlpipe.errors import ConfigError, DlpipeError, StorageError

RETRY_OPTION = "dlpipe_retry"  # the storage option that holds a RetryPolicy; never passed to fsspec
_RETRY_ENV = {"attempts": "DLPIPE_RETRY_ATTEMPTS", "base_delay": "DLPIPE_RETRY_BASE_DELAY",
              "max_delay": "DLPIPE_RETRY_MAX_DELAY", "timeout": "DLPIPE_RETRY_TIMEOUT"}


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How remote storage calls are retried.

    ``attempts``: tries per call, the first included (1 = no retries). After failure ``n`` the
    wait is uniform in ``[0, min(max_delay, base_delay * 2**(n-1))]`` seconds (full jitter), so a
    call waits at most ``max_total_delay`` in all. ``timeout``: seconds a request may wait to
    connect, or for the next bytes of an answer, before the attempt counts as failed (S3 only:
    botocore's connect and read timeouts)."""

    attempts: int = 8
    base_delay: float = 0.05
    max_delay: float = 5.0
    timeout: float = 15.0

    def __post_init__(self) -> None:
        checks = {"attempts": (int, 1), "base_delay": (float, 0.0), "max_delay": (float, 0.0), "timeout": (float, 0.0)}
        for name, (kind, low) in checks.items():
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if kind is int:
                ok = ok and float(value).is_integer() and low <= value <= 1000
            else:
                ok = ok and (value > low if name == "timeout" else value >= low)
            if not ok:
                what = "an integer from 1 to 1000" if kind is int else \
                    "a number of seconds > 0" if name == "timeout" else "a number of seconds >= 0"
                raise ConfigError(f"retry {name}={value!r}: expected {what}")
            object.__setattr__(self, name, kind(value))

    def delay(self, failures: int, rand: random.Random | None = None) -> float:
        """Seconds to wait after the ``failures``-th failed attempt in a row."""
        cap = min(self.max_delay, self.base_delay * 2.0 ** min(failures - 1, 60))
        return cap * (rand or random).random()

    @property
    def max_total_delay(self) -> float:
        """The most one call can spend waiting between its attempts."""
        return sum(min(self.max_delay, self.base_delay * 2.0 ** min(i, 60)) for i in range(self.attempts - 1))

    @classmethod
    def parse(cls, text: str) -> dict[str, float]:
        """``"attempts=3, timeout=5"`` (commas or spaces between fields) as {field: number}."""
        out: dict[str, float] = {}
        for part in re.split(r"[,\s]+", text.strip()):
            if not part:
                continue
            name, sep, raw = part.partition("=")
            if not sep:
                raise ConfigError(f"retry setting {part!r}: expected name=value, names {', '.join(_RETRY_ENV)}")
            out[_field(name)] = _number(f"retry {name}", raw)
        return out

    @classmethod
    def resolve(cls, option: Any = None, environ: Mapping[str, str] | None = None) -> RetryPolicy:
        """The defaults, overridden by ``DLPIPE_RETRY_*`` in ``environ``, then by ``option``
        (the ``dlpipe_retry`` storage option: a mapping or a ``parse`` string)."""
        environ = os.environ if environ is None else environ
        fields: dict[str, float] = {}
        for name, var in _RETRY_ENV.items():
            raw = environ.get(var, "").strip()
            if raw:
                fields[name] = _number(var, raw)
        if isinstance(option, str):
            fields.update(cls.parse(option))
        elif isinstance(option, Mapping):
            fields.update({_field(str(k)): _number(f"{RETRY_OPTION}.{k}", v) for k, v in option.items()})
        elif option is not None:
            raise ConfigError(f"storage option {RETRY_OPTION}: expected a dict or 'name=value,...', "
                              f"got {type(option).__name__}")
        return cls(**fields)


def _field(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    if key not in _RETRY_ENV:
        raise ConfigError(f"retry setting {name!r}: unknown; use {', '.join(_RETRY_ENV)}")
    return key


def _number(where: str, raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise ConfigError(f"{where}={raw!r}: expected a number")
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{where}={raw!r}: expected a number") from None
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


class _ShortRead(OSError):
    """A range read returned fewer bytes than asked although the object holds them."""


_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_TRANSIENT_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "TooManyRequests", "RequestTimeout",
                              "RequestTimeoutException", "InternalError", "ServiceUnavailable", "RequestLimitExceeded",
                              "BandwidthLimitExceeded", "PriorRequestNotComplete", "OperationAborted"})
# by class name (any class in the MRO), so that no backend needs importing: the network-level
# failures of botocore, aiohttp, http.client, fsspec and the standard library
_TRANSIENT_TYPES = frozenset({"ConnectionError", "TimeoutError", "FSTimeoutError", "HTTPClientError",
                              "IncompleteReadError", "ResponseStreamingError", "ClientPayloadError",
                              "ClientConnectionError", "ServerTimeoutError", "IncompleteRead", "ResponseParserError",
                              "_ShortRead"})
_NEVER_TYPES = frozenset({"SSLError", "CertificateError", "ClientConnectorCertificateError", "ClientSSLError"})
_TRANSIENT_ERRNO = frozenset({errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED,
                              errno.ECONNREFUSED, errno.EPIPE})


def _chain(e: BaseException) -> list[BaseException]:
    seen, todo, out = set(), [e], []
    while todo and len(out) < 12:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        out.append(x)
        todo += [x.__cause__, x.__context__]
    return out


def _http(e: BaseException) -> tuple[int | None, str | None, str | None]:
    """(status, error code, message) of an HTTP error answer (botocore's ClientError, aiohttp's
    ClientResponseError, gcsfs's HttpError), else Nones."""
    response = getattr(e, "response", None)
    if isinstance(response, Mapping):
        err = response.get("Error") or {}
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        return (status if isinstance(status, int) else None), err.get("Code"), err.get("Message")
    status = getattr(e, "status", None)
    if status is None and type(e).__name__ == "HttpError":
        status = getattr(e, "code", None)
    return (status if isinstance(status, int) and not isinstance(status, bool) else None), None, None


def is_transient(e: BaseException) -> bool:
    """Whether a failed storage request is worth trying again: throttling, server errors,
    network failures and timeouts; never a missing object, a refusal or a bad request."""
    if isinstance(e, (*_PERMANENT, DlpipeError)):
        return False
    chain = _chain(e)
    for x in chain:  # an HTTP answer decides (s3fs raises OSError(EBUSY) for a 409 too)
        status, code, _ = _http(x)
        if status is not None or code is not None:
            return status in _TRANSIENT_STATUS or code in _TRANSIENT_CODES
    for x in chain:
        names = {t.__name__ for t in type(x).__mro__}
        if names & _NEVER_TYPES:  # TLS failures (a certificate) do not heal by themselves
            return False
        if names & _TRANSIENT_TYPES:
            return True
        if isinstance(x, OSError) and x.errno in _TRANSIENT_ERRNO:
            return True
    return False


def _cause(e: BaseException) -> str:
    """One short line: the HTTP answer if there was one, else the exception."""
    for x in _chain(e):
        status, code, message = _http(x)
        if status is not None or code is not None:
            text = " ".join(str(p) for p in ("HTTP", status, code) if p is not None and p != str(status))
            return f"{text} ({message})" if message else text
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


_SECRET_NAMES = re.compile(r"key|secret|token|password|credential|username", re.I)


def _redact(text: str, options: Mapping[str, Any]) -> str:
    """``text`` on one line, at most 300 characters, without the values of secret-looking
    storage options or a user:password@ in a URL."""
    def secrets(node: Mapping[str, Any]) -> Iterator[str]:
        for k, v in node.items():
            if isinstance(v, Mapping):
                yield from secrets(v)
            elif isinstance(v, str) and len(v) >= 4 and _SECRET_NAMES.search(str(k)):
                yield v
    for value in secrets(options):
        text = text.replace(value, "***")
    text = re.sub(r"(://)[^/@\s]+@", r"\1***@", " ".join(text.split()))
    return text if len(text) <= 300 else text[:297] + "..."


log = logging.getLogger("dlpipe.storage")
_CALLS = threading.local()  # depth of Location calls on this thread: only the outermost retries


def retried(what: str):
    """Decorates a method of ``dlpipe.storage.Location``: a remote call, retried by the Location's RetryPolicy when it fails transiently
    (the call must be safe to repeat: reads, whole-object writes, deletes). Other failures
    surface as OSError, as local ones do: callers turn OSError into one-line errors, and
    botocore, gcsfs and aiohttp raise their own types."""

    def decorate(method):
        @functools.wraps(method)
        def wrapper(self, *args, **kwargs):
            if not self.remote:
                return method(self, *args, **kwargs)
            if getattr(_CALLS, "depth", 0):  # inside another Location call, which retries the whole
                return method(self, *args, **kwargs)
            policy = self.retry_policy
            _CALLS.depth = 1
            try:
                failures = 0
                while True:
                    try:
                        return method(self, *args, **kwargs)
                    except DlpipeError:
                        raise
                    except Exception as e:
                        if not is_transient(e):
                            if isinstance(e, OSError):
                                raise
                            raise OSError(errno.EIO, _redact(f"{type(e).__name__}: {e}", self.storage_options)) \
                                from e
                        failures += 1
                        cause = _redact(_cause(e), self.storage_options)
                        if failures >= policy.attempts:
                            op = what
                            if method.__name__ == "read_bytes":
                                start = args[0] if args else kwargs.get("start")
                                end = args[1] if len(args) > 1 else kwargs.get("end")
                                if start is not None or end is not None:
                                    op = f"{what} of bytes {start}-{end}"
                            times = "1 attempt" if failures == 1 else f"{failures} attempts"
                            raise StorageError(self.url, f"{self.url}: {op} failed after {times}; last error: "
                                                         f"{cause}", failures) from e
                        wait = policy.delay(failures)
                        log.debug("%s: %s failed (%s); attempt %d of %d in %.2f s", self.url, what, cause,
                                  failures + 1, policy.attempts, wait)
                        time.sleep(wait)
            finally:
                _CALLS.depth = 0

        return wrapper

    return decorate
