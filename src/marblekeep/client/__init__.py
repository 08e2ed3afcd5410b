"""Client API SDK: talk to a marblekeep (or MarbleRun) Coordinator over HTTPS.

Public API::

    connect(addr, TrustSettings(cert_path=..., insecure=..., era=..., collateral=..., nonce=...),
            now=..., warn=...) -> Connection          # attest on first contact, pin, then TLS-pinned
    CoordinatorClient(addr, root, client_cert=None)  # .status() .quote(nonce) .manifest()
                                                     # .set_manifest(raw) .update_log()
                                                     # .pending_update() -> PendingUpdateInfo
                                                     # .update_log_with_head() -> SignedUpdateLog
        # user endpoints (client_cert of a manifest user): .read_secrets(names) .write_secrets(upload)
        #     .apply_update(raw) / .acknowledge_update(raw) / .cancel_update() -> UpdateAnswer
        # recovery mode: .recover(secret, signature) -> RecoverAnswer, .recovery_public_key() -> DER
    CoordinatorClient.unverified(addr)               # no TLS authentication (first-contact quote only)
    parse_era_config(data, source) -> EraConfig
    verify_coordinator_quote(quote, root, nonce, era, accepted_tcb_statuses, collateral, now)
    pin_path(addr, env, home) -> Path                 # the pin of one Coordinator (per address)
    default_cert_path(env, home) / load_pinned_root(path) / save_pinned_root(path, cert)
    pinned_context(root, client_cert=None) -> PinnedRootContext

Every call tries the v2 endpoint and falls back to v1 when the Coordinator answers 405
(``update_log_with_head``, ``recover`` and ``recovery_public_key`` exist in v2 only).
Errors (all from :mod:`marblekeep.errors`)::

    CoordinatorError          the Coordinator failed the request (its message), sent something that
    │                         is not JSend, or could not be reached
    └── EndpointMissing       405: neither v2 nor v1 serves it
    AuthenticationError       401: no or unknown user certificate
    AuthorizationError        403
    AttestationError          the Coordinator is not trusted: quote, era config, pinned-root mismatch
    └── CollateralError       collateral missing or expired
    ConfigError               bad local input: era config, client certificate, pin file
"""

from marblekeep.client.api import (
    CertQuote,
    CoordinatorClient,
    ManifestInfo,
    PendingUpdateInfo,
    RecoverAnswer,
    SignedUpdateLog,
    Status,
    UpdateAnswer,
    base_url,
    manifest_json,
)
from marblekeep.client.attest import (
    DEFAULT_ACCEPTED_TCB_STATUSES,
    EraConfig,
    coordinator_report_data,
    parse_era_config,
    verify_coordinator_quote,
)
from marblekeep.client.jsend import EndpointMissing, clean_text, decode_envelope
from marblekeep.client.pinning import (
    PIN_FILE_ENV,
    NotFromPinnedRoot,
    PinnedRootContext,
    default_cert_path,
    load_pinned_root,
    pinned_context,
    save_pinned_root,
)
from marblekeep.client.session import Connection, TrustSettings, connect, pin_name, pin_path

__all__ = [
    "DEFAULT_ACCEPTED_TCB_STATUSES",
    "PIN_FILE_ENV",
    "CertQuote",
    "Connection",
    "CoordinatorClient",
    "EndpointMissing",
    "EraConfig",
    "ManifestInfo",
    "NotFromPinnedRoot",
    "PendingUpdateInfo",
    "PinnedRootContext",
    "RecoverAnswer",
    "SignedUpdateLog",
    "Status",
    "TrustSettings",
    "UpdateAnswer",
    "base_url",
    "clean_text",
    "connect",
    "coordinator_report_data",
    "decode_envelope",
    "default_cert_path",
    "load_pinned_root",
    "manifest_json",
    "parse_era_config",
    "pin_name",
    "pin_path",
    "pinned_context",
    "save_pinned_root",
    "verify_coordinator_quote",
]
