"""The error answers both APIs (controller and agent) share: one shape, ``{"error": {code, message, remedy, …}}``,
and bad input that never echoes the input (it may hold secrets: disk keys, host secrets, tokens)."""
from __future__ import annotations

from typing import Awaitable, Callable

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from kvmotion.common.errors import InvalidInputError, KvmotionError

MAX_FIELD_ERRORS = 20


async def kvmotion_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, KvmotionError)
    return JSONResponse(status_code=exc.http_status, content={"error": exc.to_dict()})


def invalid_input(remedy: str) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
    """The handler of ``RequestValidationError``: a 422 naming each field (where, what is wrong, the kind of
    error) and nothing of the value that was sent."""
    async def handler(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type"))}
                  for e in exc.errors()][:MAX_FIELD_ERRORS]
        text = "; ".join(f"{'.'.join(x for x in e['loc'] if x != 'body') or 'body'}: {e['msg']}" for e in errors)
        err = InvalidInputError(f"invalid request: {text}", remedy=remedy, details={"errors": errors})
        return JSONResponse(status_code=422, content={"error": err.to_dict()})
    return handler
