"""The HTTP edge of the service: one error shape, the error glue of every endpoint, and the
ASGI guard that runs before BentoML parses a request.

Every answer other than 200 is ``{"error": one line, "status": code}`` with the header
``X-BBService-Error: 1``: :class:`HTTPError` and the project's errors through
:func:`answers_errors`; BentoML's own 4xx answers (validation) rewritten by
:class:`RequestGuard`.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.datastructures import Headers, UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse

from bbservice.errors import BBServiceError, TooLargeError, first_line
from bbservice.service.settings import Settings

log = logging.getLogger("bbservice.service")

FILE_FIELDS = {"/caption": {"image"}, "/generate": {"primer"}, "/generate_json": {"primer"}}


class HTTPError(Exception):
    """An answer other than 200, with a one-line message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error_response(status: int, message: str) -> JSONResponse:
    headers = {"X-BBService-Error": "1"}
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


def as_http_error(err: Exception) -> HTTPError:
    """413 for inputs over a limit, 400 for the project's errors, else a logged 500."""
    if isinstance(err, HTTPError):
        return err
    if isinstance(err, TooLargeError):
        return HTTPError(413, first_line(err))
    if isinstance(err, BBServiceError):
        return HTTPError(400, first_line(err))
    log.exception("unexpected error while answering a request")
    return HTTPError(500, "internal error; the server log has the details")


def answers_errors(endpoint: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Decorate an ``async`` endpoint: any exception becomes the one error answer."""

    @functools.wraps(endpoint)
    async def guarded(*args, **kwargs):
        try:
            return await endpoint(*args, **kwargs)
        except Exception as err:
            http = as_http_error(err)
            return error_response(http.status, http.message)

    return guarded


# --------------------------------------------------------------------------------------------
# Request guard: body size limit and sane form fields, before BentoML parses anything
# --------------------------------------------------------------------------------------------


class RequestGuard:
    """ASGI middleware: body limit (413) and file fields that really are files (400).

    The body of a ``POST`` is read here (at most ``max_bytes``; a larger ``Content-Length`` is
    refused before reading) and replayed to the application. For the endpoints that take files,
    a form whose file field holds text is refused: BentoML would otherwise treat the text as a
    URL to download.
    """

    def __init__(self, app, max_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes or Settings.from_env().max_upload_bytes

    async def _reply(self, scope, receive, send, status: int, message: str) -> None:
        await error_response(status, message)(scope, receive, send)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        body, problem = await self._read_body(headers, receive)
        if body is None and problem is None:
            return  # the client went away
        fields = FILE_FIELDS.get(scope["path"].rstrip("/") or "/")
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if problem is None and fields and ctype in FORM_TYPES:
            message = await self._check_form(scope, body, fields)
            problem = (400, message) if message else None
        if problem is not None:
            return await self._reply(scope, receive, send, *problem)

        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, _ClientErrorRewriter(send))

    async def _read_body(self, headers: Headers, receive) -> tuple[bytes | None, tuple | None]:
        """(body, None), or (None, (status, message)) when refused, or (None, None) when the
        client disconnected."""
        too_big = (
            413,
            f"request body is larger than the limit of {self.max_bytes} bytes "
            "(BBSERVICE_MAX_UPLOAD_BYTES)",
        )
        length = headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return None, (400, "invalid Content-Length")
            if declared > self.max_bytes:
                return None, too_big
        chunks, total, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                return None, too_big
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks), None

    @staticmethod
    async def _check_form(scope, body: bytes, fields: set[str]) -> str | None:
        done = False

        async def once():
            nonlocal done
            if done:
                return {"type": "http.disconnect"}
            done = True
            return {"type": "http.request", "body": body, "more_body": False}

        request = Request(scope, once)
        try:
            form = await request.form(max_files=8, max_fields=64)
        except Exception as err:  # malformed multipart: starlette raises several types
            detail = getattr(err, "detail", None) or first_line(err)
            return f"malformed form data: {detail}"
        try:
            for name in sorted(fields):
                for value in form.getlist(name):
                    if not isinstance(value, UploadFile):
                        return (
                            f"'{name}' must be an uploaded file (multipart/form-data, e.g. "
                            f"curl -F {name}=@FILE), not a text value"
                        )
        finally:
            await form.close()
        return None


FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def client_error_body(status: int, body: bytes) -> bytes:
    """BentoML's 4xx bodies in this service's shape: ``{"error": one line, "status": ...}``.

    Validation errors (``{"error": "1 validation error for Input", "detail": [...]}``) become
    ``"beam_size: Input should be less than or equal to 10"``; ``[{"error": ...}]`` is unwrapped.
    """
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        text = body.decode("utf-8", "replace").strip()
        return json.dumps({"error": text or f"HTTP {status}", "status": status}).encode()
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
        data = data[0]
    if not isinstance(data, dict) or "status" in data:
        return body
    out = {"error": str(data.get("error") or f"HTTP {status}"), "status": status}
    detail = data.get("detail")
    if isinstance(detail, list) and detail and all(isinstance(d, dict) for d in detail):
        parts = []
        for d in detail:
            where = ".".join(str(p) for p in d.get("loc", ()) if p not in ("body",)) or "body"
            parts.append(f"{where}: {d.get('msg', 'invalid')}")
        out["error"] = "; ".join(parts)
        out["detail"] = detail
    elif detail:
        out["error"] = str(detail)
    return json.dumps(out).encode()


class _ClientErrorRewriter:
    """An ASGI ``send`` that rewrites 4xx bodies not made here with :func:`client_error_body`."""

    def __init__(self, send) -> None:
        self.send = send
        self.start: dict | None = None
        self.chunks: list[bytes] = []

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            ours = any(k.lower() == b"x-bbservice-error" for k, _ in message.get("headers", []))
            if 400 <= message["status"] < 500 and not ours:
                self.start = message
                return
        elif message["type"] == "http.response.body" and self.start is not None:
            self.chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = client_error_body(self.start["status"], b"".join(self.chunks))
            drop = (b"content-length", b"content-type")
            headers = [(k, v) for k, v in self.start.get("headers", []) if k.lower() not in drop]
            headers += [(b"content-length", str(len(body)).encode())]
            headers += [(b"content-type", b"application/json")]
            await self.send({**self.start, "headers": headers})
            self.start = None
            return await self.send({"type": "http.response.body", "body": body})
        await self.send(message)


__all__ = [
    "HTTPError",
    "RequestGuard",
    "answers_errors",
    "as_http_error",
    "client_error_body",
    "error_response",
]


class GetModels:
    """ASGI middleware: ``GET /models`` answered by the ``/models`` endpoint.

    A BentoML 1.4 API is POST only (``@bentoml.api`` has no method option) and a mounted route
    would not see the service instance, so a body-less ``GET /models`` goes on as ``POST``.
    """

    PATHS = ("/models", "/models/")

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] in self.PATHS:
            scope = {**scope, "method": "POST"}
        await self.app(scope, receive, send)
