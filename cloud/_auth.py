"""Operator authentication for the dashboard and the read API.

* Passwords are hashed with argon2id (argon2-cffi); only the hash is stored.
* A login creates a server-side session in the backend: the cookie carries a random token,
  the backend keeps only its SHA-256 (a leaked database opens no session).  Logging out, or
  removing the operator, ends the session at once.
* The cookie is ``HttpOnly``, ``SameSite=Lax`` and ``Secure`` when the request came over TLS
  (or always, with ``EDGEPIPE_CLOUD_SECURE_COOKIES=1`` behind a TLS-terminating proxy).
* Every state-changing form carries a CSRF token: before login a double-submit cookie, after
  login the token bound to the session.  A cross-origin ``Origin`` header is refused as well.
* Failed logins are rate limited per client address and per user name; beyond the limit the
  answer is 429 with ``Retry-After``.  An attempt is reserved before its password is checked,
  so the limit holds however many logins arrive at once.
* Passwords are verified on a :class:`PasswordChecker`: a pool of its own (one thread by
  default, a bounded queue, overflow answered 429 before any work), so argon2 never holds a
  thread that serves uploads and leaves the other cores to them.

A device signature opens none of this: operators are identified only by the session cookie
(or the optional API bearer token of the settings, for scripts).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import inspect
import secrets
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qs

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from core._clock import now_ms

from ._errors import Rejected

__all__ = [
    "CSRF_COOKIE",
    "SESSION_COOKIE",
    "LoginLimiter",
    "PasswordChecker",
    "hash_password",
    "new_token",
    "operator_authorizer",
    "operator_endpoint",
    "require_operator",
    "session_key",
    "verify_password",
]

SESSION_COOKIE = "ep_session"
_UNSET = object()
CSRF_COOKIE = "ep_csrf"

Endpoint = Callable[[Request], Awaitable[Response]]

_hasher = PasswordHasher()  # argon2id, the library's current recommended parameters
_dummy_hash: str | None = None


def hash_password(password: str) -> str:
    if not password:
        raise ValueError("the password must not be empty")
    return _hasher.hash(password)


def verify_password(pwhash: str | None, password: str) -> bool:
    """Constant work whether or not the operator exists (an unknown name is checked against
    a dummy hash), so timing does not reveal operator names."""
    global _dummy_hash
    if pwhash is None:
        if _dummy_hash is None:
            _dummy_hash = _hasher.hash(secrets.token_hex(16))
        pwhash, password = _dummy_hash, password + "\x00"
    try:
        return _hasher.verify(pwhash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(pwhash: str) -> bool:
    return _hasher.check_needs_rehash(pwhash)


def new_token() -> str:
    return secrets.token_urlsafe(32)


def session_key(token: str) -> str:
    """What the backend stores for a session cookie value."""
    return hashlib.sha256(token.encode()).hexdigest()


def tokens_equal(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(str(a).encode(), str(b).encode())


# -- rate limiting ------------------------------------------------------------------------------
class LoginLimiter:
    """Sliding-window count of failed logins per key (``ip:...``, ``user:...``).

    In memory, per receiver process; bounded (the oldest keys are dropped past ``max_keys``).
    """

    def __init__(self, max_failures: int = 5, window_s: float = 300, max_keys: int = 100_000):
        self.max_failures, self.window_s, self.max_keys = max_failures, window_s, max_keys
        self._fails: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def retry_after(self, keys: Iterable[str], now: float | None = None) -> int | None:
        """Seconds until a login may be tried again, or None if none of ``keys`` is blocked."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return self._retry_after_locked(list(keys), now)

    def reserve(self, keys: Iterable[str], now: float | None = None) -> int | None:
        """Atomically: if none of ``keys`` is blocked, count this attempt as a failure of
        each (until :meth:`succeeded` says otherwise) and return None; else the seconds to
        wait.  Reserving before the password is checked keeps the limit under concurrency."""
        now = time.monotonic() if now is None else now
        keys = list(keys)
        with self._lock:
            wait = self._retry_after_locked(keys, now)
            if wait is None:
                self._failed_locked(keys, now)
            return wait

    def _retry_after_locked(self, keys: list[str], now: float) -> int | None:
        wait = 0.0
        for key in keys:
            q = self._fails.get(key)
            if not q:
                continue
            while q and q[0] <= now - self.window_s:
                q.popleft()
            if len(q) >= self.max_failures:
                wait = max(wait, q[len(q) - self.max_failures] + self.window_s - now)
        return max(1, int(wait + 0.999)) if wait > 0 else None

    def _failed_locked(self, keys: list[str], now: float) -> None:
        for key in keys:
            q = self._fails.get(key)
            if q is None:
                if len(self._fails) >= self.max_keys:
                    self._fails.pop(next(iter(self._fails)))
                q = self._fails[key] = deque(maxlen=self.max_failures * 4)
            q.append(now)

    def release(self, key: str) -> None:
        """Take back one reserved attempt of ``key`` (a login that succeeded)."""
        with self._lock:
            q = self._fails.get(key)
            if q:
                q.pop()
                if not q:
                    self._fails.pop(key, None)

    def failed(self, keys: Iterable[str], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._failed_locked(list(keys), now)

    def succeeded(self, key: str) -> None:
        with self._lock:
            self._fails.pop(key, None)


# -- password checks -----------------------------------------------------------------------------
class PasswordChecker:
    """argon2 verification on its own ``workers`` threads (apart from the threads that
    serve uploads) with at most ``queue`` checks waiting.  A place on the pool is taken
    before anything of the attempt runs (the operator's hash is looked up on the pool too),
    so an attempt refused because the pool is full cost nothing: :class:`Rejected` 429.

    ``checks`` counts the verifications made, ``overflow`` the attempts refused; ``verifier``
    (``verify_password`` by default) does the check itself."""

    def __init__(
        self,
        workers: int = 1,
        queue: int = 8,
        *,
        verifier: Callable[[str | None, str], bool] = verify_password,
    ) -> None:
        self.workers, self.queue = workers, queue
        self._verifier = verifier
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="edgepipe-password")
        self._slots = workers + queue
        self._lock = threading.Lock()
        self.checks = 0
        self.overflow = 0
        self.pending = 0  # attempts holding a place (running or waiting); event loop only

    async def run(self, func: Callable[..., Any], *args: Any) -> Any:
        """``func(*args)`` on the pool, or raise :class:`Rejected` 429 if it is full."""
        if self.pending >= self._slots:
            self.overflow += 1
            raise Rejected(
                429,
                "busy",
                "too many sign-ins in progress; retry shortly",
                headers={"Retry-After": "1"},
            )
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, func, *args)
        finally:
            self.pending -= 1

    async def check(
        self, lookup: Callable[[], str | None], password: str
    ) -> tuple[bool, str | None]:
        """(whether ``password`` matches, the hash it was checked against) for the hash
        ``lookup()`` returns (None: no such operator, checked against a dummy hash)."""
        return await self.run(self._check, lookup, password)

    def _check(self, lookup: Callable[[], str | None], password: str) -> tuple[bool, str | None]:
        pwhash = lookup()
        with self._lock:
            self.checks += 1
        return self._verifier(pwhash, password), pwhash

    def snapshot(self) -> dict[str, int]:
        return {
            "password_checks": self.checks,
            "overflow": self.overflow,
            "pending": self.pending,
            "workers": self.workers,
            "queue": self.queue,
        }

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# -- forms --------------------------------------------------------------------------------------
MAX_FORM_BYTES = 16 * 1024


async def read_form(request: Request) -> dict[str, str]:
    """A small ``application/x-www-form-urlencoded`` body (the dashboard's only form kind),
    bounded while reading; first value of each field."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        raise Rejected(415, "unsupported_media_type", "forms must be url-encoded")
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_FORM_BYTES:
            raise Rejected(413, "too_large", f"form exceeds {MAX_FORM_BYTES} bytes")
    fields = parse_qs(data.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in fields.items()}


# -- sessions -------------------------------------------------------------------------------
async def current_session(request: Request) -> dict[str, Any] | None:
    """The live session of this request (cached on ``request.state``), or None."""
    cached = getattr(request.state, "session", _UNSET)
    if cached is not _UNSET:
        return cached
    session = None
    token = request.cookies.get(SESSION_COOKIE)
    if token and len(token) <= 128:
        session = await run_in_threadpool(
            request.app.state.backend.get_session, session_key(token), now_ms()
        )
    request.state.session = session
    return session


def cookie_secure(request: Request) -> bool:
    forced = request.app.state.dashboard.secure_cookies
    return forced if forced is not None else request.url.scheme == "https"


def set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="lax" if name == SESSION_COOKIE else "strict",
        secure=cookie_secure(request),
    )


def check_origin(request: Request) -> None:
    """Refuse a state-changing request whose ``Origin`` is another site."""
    origin = request.headers.get("origin")
    if origin and origin != "null":
        expected = f"{request.url.scheme}://{request.url.netloc}"
        if origin.rstrip("/") != expected:
            raise Rejected(403, "csrf", "cross-origin request refused")
    elif origin == "null":
        raise Rejected(403, "csrf", "cross-origin request refused")


def operator_authorizer(api_token: str | None) -> Callable[[Request], Any]:
    """The app's operator check: a live session cookie, or ``Authorization: Bearer <token>``
    when an API token is configured.  Returns the operator name."""
    token = api_token.encode() if api_token else None

    async def authorize(request: Request) -> str:
        session = await current_session(request)
        if session is not None:
            return session["operator"]
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if (
            token is not None
            and scheme.lower() == "bearer"
            and hmac.compare_digest(given.strip().encode(), token)
        ):
            return "api-token"
        raise Rejected(
            401,
            "unauthorized",
            "operator credentials required: log in to the dashboard"
            + (" or send the API bearer token" if token else ""),
            headers={"WWW-Authenticate": 'Bearer realm="edgepipe"'} if token else {},
        )

    return authorize


async def require_operator(request: Request) -> Any:
    """Raise 401 unless the request carries operator credentials; returns the operator
    identity (stored on ``request.state.operator``).  Defers to
    ``app.state.authorize_operator`` (:func:`operator_authorizer` by default)."""
    result = request.app.state.authorize_operator(request)
    if inspect.isawaitable(result):
        result = await result
    request.state.operator = result
    return result


def operator_endpoint(func: Endpoint) -> Endpoint:
    """An endpoint that only operators reach (:func:`require_operator` first)."""

    @functools.wraps(func)
    async def wrapper(request: Request) -> Response:
        await require_operator(request)
        return await func(request)

    return wrapper
