"""Who is looking at the console: the gateway's own API keys, from a Bearer header or a login cookie.

Scripts and tests send ``Authorization: Bearer <key>`` exactly as to ``/v1``. A browser signs in once on
``/console/login`` with its key; the key is kept in an ``HttpOnly``, ``SameSite=Strict`` cookie scoped to
``/console`` (the page's JavaScript never sees it, and no other site can make the browser send it), and
looked up by hash on every request like a Bearer key, so revoking the key signs the browser out.
Forms that act also carry a token derived from the key (``csrf_token``): a cookie alone cannot act.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from fastapi import Request

from feedback import store
from feedback.models import User

COOKIE = "ownllm_console_key"
CSRF_LABEL = b"ownllm-console-csrf-v1"


class ConsoleError(Exception):
    """An HTTP error the console renders as a page (401 sign in, 403 not staff, 404, 400 bad input)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class LoginRequired(Exception):
    """No credentials at all: a browser is sent to the login form."""


@dataclass(frozen=True)
class Viewer:
    user: User
    key: str
    via_cookie: bool

    @property
    def is_staff(self) -> bool:
        return bool(self.user.is_staff)

    @property
    def csrf(self) -> str:
        return csrf_token(self.key)


def csrf_token(key: str) -> str:
    return hmac.new(key.encode(), CSRF_LABEL, hashlib.sha256).hexdigest()


def credentials(request: Request) -> tuple[str | None, bool]:
    """The key a request carries and whether it came from the cookie (Bearer header first)."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and key.strip():
        return key.strip(), False
    cookie = request.cookies.get(COOKIE)
    return (cookie, True) if cookie else (None, False)


def viewer(request: Request) -> Viewer:
    """FastAPI dependency: the signed-in user, or LoginRequired / a 401 for a key the store does not know."""
    key, via_cookie = credentials(request)
    if key is None:
        raise LoginRequired()
    with request.app.state.factory() as s:
        user = store.authenticate(s, key)
    if user is None:
        raise ConsoleError(401, "invalid or revoked API key: sign in again with a valid key")
    return Viewer(user, key, via_cookie)


def require_staff(v: Viewer, action: str) -> None:
    if not v.is_staff:
        raise ConsoleError(403, f"{action} needs a staff key; {v.user.name!r} is not staff")


def check_csrf(v: Viewer, token: str | None) -> None:
    """A form posted with the cookie must carry the key's token; a Bearer request has no ambient credential."""
    if v.via_cookie and not (token and hmac.compare_digest(token, v.csrf)):
        raise ConsoleError(403, "the form's csrf token is missing or wrong: reload the page and try again")
