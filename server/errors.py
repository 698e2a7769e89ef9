"""The exception tree that the registry, engine and API raise.

Owns: the names of the failure classes a client can cause or see. It does not
know HTTP: the API layer (`server.api.errors`) holds the one table that turns
each class into a status code and an OpenAI error body, in responses and in
SSE error events alike.

    LoraplexError                 base; anything unexpected is mapped to 500
    ├── InvalidRequest            a bad value in a request        (400)
    ├── Unauthorized              no or wrong credentials          (401)
    ├── Forbidden                 right credentials, wrong route   (403)
    ├── NotFound                  unknown model, adapter or job    (404)
    ├── RequestTimeout            ran past server.request_timeout_s (408)
    ├── Conflict                  name taken by other content      (409)
    ├── PayloadTooLarge           body over the configured cap     (413)
    ├── InvalidAdapter            adapter files refused            (422)
    ├── Overloaded                queue or capacity full           (429)
    └── NotReady                  loading or shutting down         (503)
"""

from __future__ import annotations


class LoraplexError(Exception):
    """Base class. `param` names the request field at fault, `code` a stable
    machine-readable reason (for example ``model_not_found``)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequest(LoraplexError):
    pass


class Unauthorized(LoraplexError):
    pass


class Forbidden(LoraplexError):
    pass


class NotFound(LoraplexError):
    pass


class RequestTimeout(LoraplexError):
    pass


class Conflict(LoraplexError):
    pass


class PayloadTooLarge(LoraplexError):
    pass


class InvalidAdapter(LoraplexError):
    pass


class Overloaded(LoraplexError):
    def __init__(self, message: str, *, retry_after: int = 1, **kw):
        super().__init__(message, **kw)
        self.retry_after = retry_after


class NotReady(LoraplexError):
    pass


class StorageError(LoraplexError):
    """The registry's state could not be written; the operation was rolled back."""


class ConfigError(Exception):
    """A bad configuration value; the message names the TOML key and the value."""
