"""The error envelope as an OpenAPI schema: what proxy.errors.ProxyError.body() builds and
llmrotate_site.api renders for every error of the ninja API. Operations list these in their
`response=` so that the OpenAPI document says what a 401, 403, 404 or 422 holds."""

from __future__ import annotations

from ninja import Field, Schema


class ErrorDetailOut(Schema):
    message: str = Field(description="What went wrong and, for a bad parameter, what is accepted.")
    type: str = Field(description="invalid_request_error, authentication_error, …")
    code: str = Field(description="A stable code: invalid_parameter, missing_api_key, …")
    param: str | None = Field(description="The parameter at fault, if one is.")


class ErrorOut(Schema):
    error: ErrorDetailOut


# What an operation behind monitor_auth may answer besides its own responses.
AUTH_ERRORS: dict[int, type[Schema]] = {401: ErrorOut, 403: ErrorOut}
