"""What stands before the endpoints: HTTP Basic authentication (``--api-auth``), the 50 MB cap on a request's
body (413, as a proxy would answer), and request validation errors as one line naming the field."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any, Callable

from fastapi import Depends, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DRAIN_FACTOR = 4  # a refused body is read on up to 4x the limit (200 MB) before the answer
DRAIN_SECONDS = 30.0


def basic_auth(users: tuple[tuple[str, str], ...]) -> Callable[..., None]:
    """A dependency that lets a request through only with one of ``users``' credentials (401 otherwise, with
    ``WWW-Authenticate: Basic``, as the webui's ``--api-auth``); compared in constant time."""
    security = HTTPBasic(auto_error=False)

    def check(credentials: HTTPBasicCredentials | None = Depends(security)) -> None:
        if credentials is not None:
            for user, password in users:
                same_user = secrets.compare_digest(credentials.username.encode(), user.encode())
                same_password = secrets.compare_digest(credentials.password.encode(), password.encode())
                if same_user and same_password:
                    return
        raise HTTPException(status_code=401, detail="wrong or missing credentials (--api-auth)",
                            headers={"WWW-Authenticate": "Basic"})

    return check


def validation_message(error: RequestValidationError) -> tuple[int, str]:
    """(status, one line): 400 for a body that is not JSON, 422 naming each bad field."""
    problems = error.errors()
    for problem in problems:
        if problem.get("type") == "json_invalid":
            reason = (problem.get("ctx") or {}).get("error", "not JSON")
            return 400, f"the body is not valid JSON: {reason}"
    parts = []
    for problem in problems[:5]:
        where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body") or "body"
        parts.append(f"{where}: {problem.get('msg', 'invalid')}")
    return 422, "; ".join(parts)


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes (by its Content-Length, or counted as it arrives) is answered
    413 before any endpoint sees it (once the rest is read and dropped: ``drain``); a body within it is read whole
    first (the endpoints read it whole anyway)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            # Drained only when it can be read whole: a client that waits for "100 Continue" has sent nothing
            # (and reading would invite it to), and past the drain's cap the reset comes all the same.
            waiting = headers.get(b"expect", b"").lower() == b"100-continue"
            await self.refuse(receive, send, more_body=not waiting and int(length) <= DRAIN_FACTOR * self.limit)
            return
        parts, seen, message = [], 0, {"more_body": True}
        while message.get("more_body", False):
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            parts.append(message.get("body", b""))
            seen += len(parts[-1])
            if seen > self.limit:
                parts.clear()
                await self.refuse(receive, send, more_body=message.get("more_body", False), seen=seen)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(parts), "more_body": False}

        await self.app(scope, replay, send)

    async def refuse(self, receive: Receive, send: Send, more_body: bool, seen: int = 0) -> None:
        if more_body:
            await self.drain(receive, seen)
        body = (f'{{"error": "PayloadTooLarge", "detail": "the request body is over {self.limit // 2**20} MB"}}'
                .encode())
        headers: list[Any] = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                              (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def drain(self, receive: Receive, seen: int) -> None:
        """Read and drop the rest of the body (``seen`` bytes of it already read) before answering, up to
        ``DRAIN_FACTOR`` times the limit in all and ``DRAIN_SECONDS``: a server that closes with a body still
        unread resets the connection (TCP RST), and the client, still sending, may lose the answer (nginx's
        lingering close reads on for the same reason)."""

        async def read_rest() -> None:
            nonlocal seen
            message = {"more_body": True}
            while message.get("more_body", False) and seen <= DRAIN_FACTOR * self.limit:
                message = await receive()
                if message["type"] != "http.request":
                    return
                seen += len(message.get("body", b""))

        try:
            await asyncio.wait_for(read_rest(), DRAIN_SECONDS)
        except asyncio.TimeoutError:
            pass  # a client this slow gets the answer and the reset; the server moves on
