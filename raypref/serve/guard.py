"""The HTTP guard in front of every route of the soups server: a bearer token (when the replica
was given one) and the request body's size.

The token lives in this module, not in the app: Serve pickles the deployment class and its
FastAPI app by value when the class is decorated, so the replica's copy of ``app.api`` is not the
object a middleware would look up; this module is imported in the replica like any other.
"""
from __future__ import annotations

import hmac
from pathlib import Path

from fastapi.responses import JSONResponse

from raypref.serve.schema import MAX_BODY_BYTES

OPEN_PATHS = ("/healthz",)  # answered without the bearer token
_token: str | None = None


def set_token(token: str | None) -> None:
    global _token
    _token = token


def read_token(path: str | None) -> str | None:
    """The bearer token from ``path`` (stripped); an empty or unreadable file is an error."""
    if not path:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise ValueError(f"auth_token_file {path}: {e.strerror}") from None
    if len(token) < 16:
        raise ValueError(f"auth_token_file {path}: the token must have at least 16 characters")
    return token


class RequestGuard:
    """ASGI middleware in front of every route: the bearer token (when the replica has one) and
    the body-size limit. The body is read here, at most ``MAX_BODY_BYTES`` of it, then replayed
    to the app, so an oversized body is refused (413) before anything parses it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        token = _token
        path, root = scope.get("path", ""), scope.get("root_path", "")
        if root and path.startswith(root):  # an app under a route prefix: its own path
            path = path[len(root):]
        if token and path not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, b"Bearer " + token.encode()):
                return await _reply(scope, send, 401, "missing or wrong bearer token", {b"www-authenticate": b"Bearer"})
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():
            return await _reply(scope, send, 400, "bad content-length header")
        if int(length) > MAX_BODY_BYTES:
            return await _reply(scope, send, 413, f"request body over {MAX_BODY_BYTES} bytes")
        body, more = b"", True
        while more:  # chunked bodies have no content-length: count what arrives
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY_BYTES:
                return await _reply(scope, send, 413, f"request body over {MAX_BODY_BYTES} bytes")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _reply(scope, send, status: int, message: str, headers: dict | None = None) -> None:
    response = JSONResponse(status_code=status, content={"detail": [{"loc": [], "msg": message, "type": "http"}]},
                            headers={k.decode(): v.decode() for k, v in (headers or {}).items()})
    await response(scope, None, send)
