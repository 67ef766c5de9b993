"""The dashboard's sign-in: the login form (a double-submit CSRF cookie), its rate limit
per client address and user name (an attempt is reserved before its password is checked),
the session it opens and logging out.  Passwords are checked on the app's
:class:`cloud._auth.PasswordChecker`, never on the threads that serve uploads."""

from __future__ import annotations

import functools
import html
import logging
from urllib.parse import quote

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from core._clock import now_ms

from . import _auth as auth
from ._errors import Rejected
from ._pages import page, safe_next
from ._settings import DashboardSettings

__all__ = ["login_page", "login_submit", "logout"]

log = logging.getLogger("edgepipe.cloud.dashboard")
_e = html.escape


def _login_form(
    request: Request, csrf: str, *, error: str = "", name: str = "", status: int = 200
) -> Response:
    nxt = safe_next(request.query_params.get("next"))
    alert = f'<p class="alert" role="alert">{_e(error)}</p>' if error else ""
    body = f"""
<section class="login card">
  <h1>Operator sign-in</h1>
  <p class="muted">edgepipe cloud receiver · fleet dashboard</p>
  {alert}
  <form method="post" action="/login?next={quote(nxt, safe="")}" autocomplete="on">
    <input type="hidden" name="csrf" value="{_e(csrf)}">
    <label>User name<input name="username" autocomplete="username" required autofocus value="{_e(name)}"></label>
    <label>Password<input name="password" type="password" autocomplete="current-password" required></label>
    <button type="submit" class="primary">Sign in</button>
  </form>
</section>"""
    resp = page(request, "Sign in", body, page="login", session=None, status=status)
    auth.set_cookie(request, resp, auth.CSRF_COOKIE, csrf, 3600)
    return resp


async def login_page(request: Request) -> Response:
    if await auth.current_session(request) is not None:
        return RedirectResponse(safe_next(request.query_params.get("next")), status_code=303)
    return _login_form(request, auth.new_token())


async def login_submit(request: Request) -> Response:
    s: DashboardSettings = request.app.state.dashboard
    limiter: auth.LoginLimiter = request.app.state.login_limiter
    backend = request.app.state.backend
    auth.check_origin(request)
    form = await auth.read_form(request)
    name = form.get("username", "")[:128].strip()
    password = form.get("password", "")[:1024]
    cookie_csrf = request.cookies.get(auth.CSRF_COOKIE)
    if not auth.tokens_equal(form.get("csrf", ""), cookie_csrf):
        log.info("login refused: CSRF token missing or wrong")
        return _login_form(
            request,
            auth.new_token(),
            error="Your sign-in form expired. Please try again.",
            name=name,
            status=403,
        )
    ip = request.client.host if request.client else "unknown"
    keys = [f"ip:{ip}", f"user:{name.lower()}"]
    wait = limiter.reserve(keys)
    if wait is not None:
        return _too_many(request, cookie_csrf, name, wait, "Too many failed sign-ins")
    checker: auth.PasswordChecker = request.app.state.password_checker
    lookup = functools.partial(backend.operator_hash, name) if name else _no_operator
    try:
        ok, pwhash = await checker.check(lookup, password)
    except Rejected as busy:  # the password pool is full: this attempt was never checked
        for key in keys:
            limiter.release(key)
        return _too_many(request, cookie_csrf, name, 1, busy.detail.capitalize())
    except BaseException:
        for key in keys:
            limiter.release(key)
        raise
    if not ok:  # the reserved attempt stays counted as a failure
        log.info("failed sign-in for %r from %s", name[:64], ip)
        return _login_form(
            request,
            cookie_csrf or auth.new_token(),
            error="Wrong user name or password.",
            name=name,
            status=401,
        )
    limiter.release(f"ip:{ip}")
    limiter.succeeded(f"user:{name.lower()}")
    if pwhash is not None and auth.needs_rehash(pwhash):
        new_hash = await checker.run(auth.hash_password, password)
        await run_in_threadpool(backend.set_operator_hash, name, new_hash)
    token, now = auth.new_token(), now_ms()
    await run_in_threadpool(
        backend.create_session,
        auth.session_key(token),
        name,
        auth.new_token(),
        now,
        now + s.session_ttl_s * 1000,
    )
    resp = RedirectResponse(safe_next(request.query_params.get("next")), status_code=303)
    auth.set_cookie(request, resp, auth.SESSION_COOKIE, token, s.session_ttl_s)
    resp.delete_cookie(auth.CSRF_COOKIE, path="/")
    return resp


def _no_operator() -> None:
    return None


def _too_many(
    request: Request, cookie_csrf: str | None, name: str, wait: int, why: str
) -> Response:
    resp = _login_form(
        request,
        cookie_csrf or auth.new_token(),
        error=f"{why}. Try again in {wait} s.",
        name=name,
        status=429,
    )
    resp.headers["Retry-After"] = str(wait)
    return resp


async def logout(request: Request) -> Response:
    auth.check_origin(request)
    session = await auth.current_session(request)
    form = await auth.read_form(request)
    if session is None:
        return RedirectResponse("/login", status_code=303)
    if not auth.tokens_equal(form.get("csrf", ""), session["csrf"]):
        raise Rejected(403, "csrf", "CSRF token missing or wrong")
    token = request.cookies.get(auth.SESSION_COOKIE, "")
    await run_in_threadpool(request.app.state.backend.delete_session, auth.session_key(token))
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(auth.SESSION_COOKIE, path="/")
    return resp
