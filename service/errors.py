"""The typed errors trtserve raises, each carrying the gRPC status it maps to.

Errors cross the process boundary as data (`to_wire`/`from_wire`: a code name and a message), never as
pickled exceptions, and one interceptor in the frontend turns them into gRPC statuses.
"""

from __future__ import annotations


class ServeError(Exception):
    """Base class: `code` is the name of a `grpc.StatusCode` member."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_wire(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}

    @staticmethod
    def from_wire(data: dict[str, str]) -> ServeError:
        cls = _BY_CODE.get(data.get("code", ""), ServeError)
        return cls(str(data.get("message", "")))


class InvalidArgument(ServeError):
    """The request is malformed: the message names the input and what was expected."""

    code = "INVALID_ARGUMENT"


class NotFound(ServeError):
    """Unknown model or version."""

    code = "NOT_FOUND"


class Unavailable(ServeError):
    """The model is loading, unloading, or its worker is restarting."""

    code = "UNAVAILABLE"


class ResourceExhausted(ServeError):
    """A queue, an in-flight limit, shared memory or the buffer-pool cap is full."""

    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(ServeError):
    """The request's deadline passed before it ran."""

    code = "DEADLINE_EXCEEDED"


class FailedPrecondition(ServeError):
    """The server is in a state that does not allow the call (e.g. model control mode)."""

    code = "FAILED_PRECONDITION"


class Cancelled(ServeError):
    """The client cancelled the request."""

    code = "CANCELLED"


class ConfigError(ServeError):
    """A model's config.pbtxt or files are invalid; the message names the file and field."""

    code = "INVALID_ARGUMENT"


class InternalError(ServeError):
    """A bug or an engine failure; the message says what failed."""

    code = "INTERNAL"


_BY_CODE: dict[str, type[ServeError]] = {
    cls.code: cls
    for cls in (InvalidArgument, NotFound, Unavailable, ResourceExhausted, DeadlineExceeded,
                FailedPrecondition, Cancelled, InternalError)
}
