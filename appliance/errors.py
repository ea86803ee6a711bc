"""The one error type of the appliance, and the table that maps its codes to HTTP statuses.

Domain code raises these; the API turns them into the error body of DESIGN §11 in exactly one
place (``appliance.api.errors``). Messages may reach clients: no secrets, paths on the server
or stack traces in them.
"""

from __future__ import annotations

from typing import Any

#: Every error code the appliance emits, with its HTTP status.
STATUS_BY_CODE: dict[str, int] = {
    # request shape
    "malformed_json": 400,
    "invalid_request": 400,
    "unsupported_media_type": 415,
    "request_too_large": 413,
    "invalid_cursor": 400,
    # identity
    "unauthenticated": 401,
    "invalid_credentials": 401,
    "too_many_attempts": 429,
    "forbidden": 403,
    # objects
    "not_found": 404,
    "conflict": 409,
    "already_exists": 409,
    "immutable": 409,
    "project_archived": 409,
    "last_admin": 409,
    "idempotency_key_reused": 422,
    "validation_failed": 422,
    "cross_project_reference": 422,
    "production_requirements_unmet": 422,
    "invalid_state": 409,
    "lease_lost": 409,
    "log_gap": 409,
    "invalid_digest": 422,
    # uploads
    "empty_upload": 422,
    "unsafe_archive_member": 422,
    "malformed_archive": 422,
    "malformed_multipart": 400,
    "duplicate_path": 422,
    "invalid_path": 422,
    "upload_too_large": 413,
    "too_many_files": 413,
    # images and registry
    "image_definition_invalid": 422,
    "image_lock_stale": 409,
    "package_hash_mismatch": 422,
    "package_unavailable": 503,
    "blob_digest_mismatch": 422,
    "blob_unknown": 404,
    "unsafe_layer_entry": 422,
    "registry_error": 502,
    # models
    "approval_required": 409,
    # server side
    "signing_unavailable": 503,
    "unavailable": 503,
    "internal_error": 500,
}


class AnimusError(Exception):
    """A failure a caller can understand and act on.

    ``code`` names the failure (a key of ``STATUS_BY_CODE``); ``details`` carries structured,
    secret-free context such as the list of invalid fields.
    """

    code = "internal_error"

    def __init__(
        self, message: str, *, code: str | None = None, details: dict[str, Any] | None = None
    ):
        super().__init__(message)
        if code is not None:
            self.code = code
        if self.code not in STATUS_BY_CODE:
            raise ValueError(f"unknown error code {self.code!r}")
        self.message = message
        self.details = details or {}

    @property
    def status(self) -> int:
        return STATUS_BY_CODE[self.code]


class NotFound(AnimusError):
    code = "not_found"


class Hidden(NotFound):
    """The object exists but the caller may not know it: answered exactly like a missing one.

    Raised instead of Forbidden where existence must not leak (DESIGN §2.6); a refused
    mutation that raises it is audited like any other denial.
    """


class Conflict(AnimusError):
    code = "conflict"


class ValidationFailed(AnimusError):
    code = "validation_failed"


class Forbidden(AnimusError):
    code = "forbidden"


class Unauthenticated(AnimusError):
    code = "unauthenticated"


class UploadError(AnimusError):
    """An upload (multipart or tar stream) that cannot become a DatasetVersion."""

    code = "malformed_archive"
