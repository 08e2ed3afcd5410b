"""The one error tree of marblekeep.

Every error the project raises on purpose derives from :class:`MarbleKeepError`.
Each class carries a stable ``code`` (machine-readable, never changes once
released), an ``http_status`` used by the API edge and an ``exit_code`` used by
the CLI edge. Families are split by *who is to blame*::

    MarbleKeepError
    ├── ManifestError          the manifest (or an update of it) is invalid     400 / exit 1
    │   └── TemplateError      a Files/Env template cannot be parsed or run     400 / exit 1
    ├── SecretUploadError      a user-defined secret upload is invalid          400 / exit 1
    ├── StateError             operation not allowed in the current state       409 / exit 1
    │   └── NotFoundError      the thing asked for does not exist (no pending    404 / exit 1
    │                          update)
    ├── AuthenticationError    no or unknown client certificate                 401 / exit 1
    ├── AuthorizationError     authenticated user lacks the permission          403 / exit 1
    ├── ActivationRefused      a Marble's activation was refused                403 / exit 1
    ├── AttestationError       evidence / quote did not verify or was refused   403 / exit 1
    │   └── CollateralError    collateral missing, unreachable or expired       503 / exit 1
    ├── RequestError           malformed API request (JSON, base64, size)       400 / exit 2
    │   ├── RequestTooLarge    a request body or field exceeds its size limit    413 / exit 2
    │   └── RequestTimeout     a request body did not arrive within the limit    408 / exit 2
    ├── StoreError             the storage backend failed                       503 / exit 1
    │   └── ConflictError      compare-and-set lost against a concurrent write  409 / exit 1
    ├── SealError              the data-encryption key cannot be unwrapped       503 / exit 1
    │   ├── IntegrityError     stored data fails authentication                 500 / exit 1
    │   └── RollbackError      stored state is older than the newest sealed     503 / exit 1
    ├── RecoveryError          a recovery upload is invalid                     400 / exit 1
    ├── ConfigError            bad Coordinator / CLI configuration              - / exit 2
    │   └── DataDirLocked      another Coordinator holds the data directory       - / exit 2
    └── CoordinatorError       (client side) a Coordinator failed a request     502 / exit 1
                               or could not be reached

Messages name the thing and the fix. They never contain key material: callers
must not interpolate secret values, private keys or derived keys into them.
``problems`` carries a list of ``(path, message)`` pairs where an error reports
several things at once (manifest validation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "ActivationRefused",
    "AttestationError",
    "AuthenticationError",
    "AuthorizationError",
    "CollateralError",
    "ConfigError",
    "ConflictError",
    "CoordinatorError",
    "DataDirLocked",
    "IntegrityError",
    "ManifestError",
    "MarbleKeepError",
    "NotFoundError",
    "Problem",
    "QuoteUnavailable",
    "RecoveryError",
    "RequestError",
    "RequestTimeout",
    "RequestTooLarge",
    "RollbackError",
    "SealError",
    "SecretUploadError",
    "StateError",
    "StoreError",
    "TemplateError",
]


@dataclass(frozen=True)
class Problem:
    """One problem found in an input, located by its JSON path (``Marbles.backend.Package``)."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class MarbleKeepError(Exception):
    """Root of every error marblekeep raises on purpose."""

    code: str = "internal"
    http_status: int = 500
    exit_code: int = 1

    def __init__(self, message: str, *, problems: Sequence[Problem] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.problems: tuple[Problem, ...] = tuple(problems)

    def diagnostics(self) -> str:
        """A longer text for humans: the message and every problem on its own line."""
        if not self.problems:
            return self.message
        lines = [self.message]
        lines.extend(f"  {p}" for p in self.problems)
        return "\n".join(lines)


class ManifestError(MarbleKeepError):
    code = "manifest_invalid"
    http_status = 400


class TemplateError(ManifestError):
    code = "template_invalid"


class RenderLimitError(TemplateError):
    """A template renders more than it may, or has more actions than it may (docs/templates.md)."""

    code = "render_limit"


class SecretUploadError(MarbleKeepError):
    code = "secret_upload_invalid"
    http_status = 400


class StateError(MarbleKeepError):
    code = "wrong_state"
    http_status = 409


class NotFoundError(StateError):
    """What the request refers to does not exist right now (for example no pending update)."""

    code = "not_found"
    http_status = 404


class AuthenticationError(MarbleKeepError):
    code = "unauthenticated"
    http_status = 401


class AuthorizationError(MarbleKeepError):
    code = "forbidden"
    http_status = 403


class ActivationRefused(MarbleKeepError):
    """A Marble may not start. ``reason`` is a short stable label for metrics
    (``unknown_type``, ``undefined_package``, ``attestation``, ``max_activations``,
    ``invalid_uuid``, ``parameters``)."""

    code = "activation_refused"
    http_status = 403

    def __init__(self, message: str, *, reason: str = "refused", problems: Sequence[Problem] = ()) -> None:
        super().__init__(message, problems=problems)
        self.reason = reason


class AttestationError(MarbleKeepError):
    code = "attestation_failed"
    http_status = 403


class CollateralError(AttestationError):
    code = "collateral_unavailable"
    http_status = 503


class QuoteUnavailable(AttestationError):
    """The Coordinator could not produce its own quote (the TEE's quoting failed): not the client's fault."""

    code = "quote_unavailable"
    http_status = 503


class RequestError(MarbleKeepError):
    code = "bad_request"
    http_status = 400
    exit_code = 2


class TooManyRequests(MarbleKeepError):
    """The client sent more than its share within a time window: retry later (429)."""

    code = "too_many_requests"
    http_status = 429


class RequestTooLarge(RequestError):
    code = "request_too_large"
    http_status = 413


class RequestTimeout(RequestError):
    code = "request_timeout"
    http_status = 408


class StoreError(MarbleKeepError):
    code = "store_failed"
    http_status = 503


class ConflictError(StoreError):
    code = "conflict"
    http_status = 409


class SealError(MarbleKeepError):
    code = "unseal_failed"
    http_status = 503


class IntegrityError(SealError):
    code = "integrity_failed"
    http_status = 500


class RollbackError(SealError):
    """The stored state is older than the newest state this Coordinator sealed (rollback anchor)."""

    code = "state_rollback"
    http_status = 503


class RecoveryError(MarbleKeepError):
    code = "recovery_failed"
    http_status = 400


class ConfigError(MarbleKeepError):
    code = "config_invalid"
    http_status = 500
    exit_code = 2


class DataDirLocked(ConfigError):
    """Another process holds the data directory's lock (two Coordinators on one state)."""

    code = "data_dir_locked"


class CoordinatorError(MarbleKeepError):
    """Client side (SDK, CLI): a Coordinator answered a request with a failure, sent an answer
    that is not valid JSend, or could not be reached. ``status`` is the HTTP status, if any;
    the message is the Coordinator's own (sanitised) with the request it answered."""

    code = "coordinator_failed"
    http_status = 502

    def __init__(self, message: str, *, status: int | None = None, problems: Sequence[Problem] = ()) -> None:
        super().__init__(message, problems=problems)
        self.status = status
