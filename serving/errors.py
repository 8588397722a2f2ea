"""Errors the serving layer reports to clients, each with its HTTP status and OpenAI error type.

Every failure a client can cause is one of these, so the HTTP layer can answer in
OpenAI's shape ``{"error": {"message", "type", "code"}}`` and never with a 500.
"""

from __future__ import annotations


class ServingError(Exception):
    """A request the server refuses; ``status`` is the HTTP status it is answered with."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param

    def body(self) -> dict:
        """The OpenAI-shaped error body."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class BadRequest(ServingError):
    """Malformed or out-of-range input (400)."""


class InvalidParameters(ServingError):
    """A body that parses as JSON but does not fit the request schema (422)."""

    status = 422


class Unauthorized(ServingError):
    """Missing or wrong API key (401)."""

    status = 401
    type = "authentication_error"


class Forbidden(ServingError):
    """A request this server refuses whatever the key: e.g. from another web origin, or
    a valid key whose role may not call the route (403)."""

    status = 403
    type = "permission_error"


class UnsupportedMediaType(ServingError):
    """A body in a content type the route does not read (415)."""

    status = 415


class NotFound(ServingError):
    """An unknown model, adapter, dataset or route (404)."""

    status = 404
    type = "not_found_error"


class Conflict(ServingError):
    """A request the state of what it names refuses (409): an adapter trained for a different
    base model than the one this server holds, a fine-tuning job that cannot pause or resume."""

    status = 409
    type = "invalid_request_error"


class TooLarge(ServingError):
    """A request body or evaluation set beyond the configured limits (413)."""

    status = 413


class Overloaded(ServingError):
    """The request queue is full; retry later (429)."""

    status = 429
    type = "rate_limit_error"


class QuotaExceeded(ServingError):
    """A project past one of its quotas (429 ``quota_exceeded``; ``param`` names the quota).

    ``retry_after_s`` is the ``Retry-After`` of the answer (whole seconds, at least 1), or
    ``None`` when waiting alone does not help (delete files, or ask an admin for more).
    """

    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, quota: str, retry_after_s: int | None = None) -> None:
        super().__init__(message, code="quota_exceeded", param=quota)
        self.retry_after_s = None if retry_after_s is None else max(1, int(retry_after_s))


class Unavailable(ServingError):
    """The server cannot take requests right now (503)."""

    status = 503
    type = "server_error"


class RequestTimeout(Unavailable):
    """A request that did not finish within the server's deadline (503; retry may help)."""
