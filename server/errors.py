"""OpenAI-style errors: every failure the server answers is one of these, as
`{"error": {"message", "type", "param", "code"}}` with a fitting HTTP status."""

from __future__ import annotations

from dataclasses import dataclass

# status -> OpenAI's error type
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "request_too_large", 500: "server_error",
               503: "service_unavailable"}


@dataclass
class APIError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def too_large(message: str, param: str | None = None) -> APIError:
    return APIError(413, message, param, "request_too_large")
