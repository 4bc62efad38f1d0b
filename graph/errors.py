"""One error tree: every failure Prism reports to a client is a PrismError carrying its HTTP status."""

from __future__ import annotations

import math


class PrismError(Exception):
    """Base of every error Prism maps to HTTP; anything else is a logged 500 with the request id."""

    status_code: int = 500
    code: str = "internal_error"
    error_type: str = "server_error"

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None,
                 details: list | None = None, retry_after_s: float | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = dict(headers or {})
        self.details = list(details or [])
        self.retry_after_s = retry_after_s
        if retry_after_s is not None:  # when to come back: whole seconds, at least 1 (RFC 9110 delay-seconds)
            self.headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))

    def body(self, request_id: str) -> dict:
        """The JSON error body (OpenAI's `error` shape plus the request id)."""
        err = {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code,
               "request_id": request_id}
        if self.details:
            err["details"] = self.details
        return {"error": err}


class InvalidRequest(PrismError):
    """A field is outside its allowed range; the message names the field and the range."""

    status_code = 422
    code = "invalid_value"
    error_type = "invalid_request_error"


class NotSupported(PrismError):
    """A valid option this deployment does not serve (yet)."""

    status_code = 400
    code = "not_supported"
    error_type = "invalid_request_error"


class PayloadTooLarge(PrismError):
    status_code = 413
    code = "payload_too_large"
    error_type = "invalid_request_error"


class CapacityError(PrismError):
    """A queue is full or no replica can take the work; carries Retry-After."""

    status_code = 503
    code = "overloaded"
    error_type = "overloaded_error"

    def __init__(self, message: str, *, retry_after_s: float = 1, **kw):
        super().__init__(message, retry_after_s=retry_after_s, **kw)


class GenerationFailed(PrismError):
    """Every model in the route's chain failed or produced garbage."""

    status_code = 502
    code = "generation_failed"


class StageFailed(PrismError):
    """A post-generation stage failed (its replica died twice, or it raised): 502 naming the stage."""

    status_code = 502
    code = "stage_failed"

    def __init__(self, stage: str, message: str, **kw):
        super().__init__(message, details=[{"stage": stage}], **kw)
        self.stage = stage


class DeadlineExceeded(PrismError):
    status_code = 504
    code = "deadline_exceeded"


class NotFound(PrismError):
    """A render record (or other named resource) that does not exist, or no longer does (retention)."""

    status_code = 404
    code = "not_found"
    error_type = "invalid_request_error"


class Conflict(PrismError):
    """The request clashes with recorded state, e.g. an X-Request-ID already used for a different request."""

    status_code = 409
    code = "conflict"
    error_type = "invalid_request_error"


class BudgetExceeded(PrismError):
    """A user tier spent its configured budget and the policy says reject (429 + Retry-After)."""

    status_code = 429
    code = "budget_exceeded"
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: float = 60, **kw):
        super().__init__(message, retry_after_s=retry_after_s, **kw)


class Unauthorized(PrismError):
    """No API key where one is required, or a key that is unknown, disabled or rotated (401 + WWW-Authenticate)."""

    status_code = 401
    code = "invalid_api_key"
    error_type = "authentication_error"

    def __init__(self, message: str, **kw):
        super().__init__(message, headers={"WWW-Authenticate": 'Bearer realm="prism"'}, **kw)


class Forbidden(PrismError):
    """A valid key that may not do this (an operator route without an admin key, an expired or tampered link)."""

    status_code = 403
    code = "permission_denied"
    error_type = "permission_error"


class RateLimited(PrismError):
    """A key's own limit (renders per minute, renders at once) is reached: 429 + Retry-After, before any model work."""

    status_code = 429
    code = "rate_limit_exceeded"
    error_type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: float = 1, **kw):
        super().__init__(message, retry_after_s=retry_after_s, **kw)
