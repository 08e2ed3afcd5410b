"""Governance: who may do what, user-defined secrets, manifest updates, and their audit log.

Pure transitions on a :class:`~marblekeep.core.deployment.Deployment` (no I/O; time and
randomness are parameters). The service runs each one under its lock and commits the result in
one transaction, so a request either changes everything it asked for or nothing.

Rules (reference §1.7, §1.12, §3.4–§3.7, §6.4):

- **Permissions** come from the manifest's ``Users`` and ``Roles``: a role grants its ``Actions``
  (case-insensitive) over its ``ResourceNames``; roles add up. A check passes when the user holds
  the permission over every resource asked for. ``UpdateManifest`` is checked with no resource, so
  holding it at all is enough. Every user operation checks its permission first.
- **Secrets**: reads need ``ReadSecret`` on every name asked for; they change nothing here (the
  service records them in the authenticated secret-read audit trail, :mod:`.readaudit`).
  Writes need ``WriteSecret`` on every name, are validated
  (:func:`~marblekeep.core.usersecrets.parse_user_secrets`), dry-run against every Marble's
  templates with the real values, and are all-or-nothing.
- **Package updates** (a manifest with nothing but ``Packages``, even ``{}``) need
  ``UpdateSecurityVersion`` on every listed package and may only raise ``SecurityVersion``. The raw
  manifest and its signature stay; the new SVNs are kept beside them (``package_svns``).
- **Full updates** need ``UpdateManifest``. The users who hold it now must acknowledge the exact
  bytes; ``Config.UpdateThreshold`` of the *current* manifest says how many (0: all of them). The
  initiator's acknowledgement counts at once; a repeat is a no-op; only one update can be pending.
- **Every update** rotates the intermediate CA and the Marble root and regenerates shared
  certificates; the root CA, the seal master secret and the activation counters never change.
  A full update diffs the secrets as MarbleRun's ``updateSecrets`` does (:func:`apply_full_update`).
- **The update log** gets MarbleRun's entries (§9.1), and only those, hash-chained and with a
  head signed by the root key (:mod:`marblekeep.core.auditlog`).

No message here contains a secret value or key material.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import enum
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from marblekeep.core.auditlog import FieldValue, append_entry, encode_head, sign_head
from marblekeep.core.deployment import CaSet, CoordinatorState, Deployment, PendingUpdate
from marblekeep.core.usersecrets import parse_user_secrets
from marblekeep.crypto.pki import CertifiedKey, create_intermediate
from marblekeep.crypto.secretgen import generate_shared_secrets
from marblekeep.crypto.signing import sign_manifest
from marblekeep.errors import (
    AuthorizationError,
    IntegrityError,
    ManifestError,
    MarbleKeepError,
    NotFoundError,
    Problem,
    RequestError,
    SecretUploadError,
    StateError,
)
from marblekeep.manifest import dry_run, load_manifest, manifest_fingerprint
from marblekeep.manifest.gojson import Decoder, JObject, parse_json
from marblekeep.manifest.model import Manifest, Package, Secret, SecretType
from marblekeep.manifest.parse import parse_manifest_tree
from marblekeep.manifest.validate import did_you_mean

__all__ = [
    "ALL_ACKNOWLEDGED",
    "CANCELLED",
    "Permission",
    "UpdateKind",
    "UpdateOutcome",
    "acknowledge_update",
    "cancel_update",
    "consolidate_manifest",
    "is_package_update",
    "is_permitted",
    "log_initial_manifest",
    "pending_message",
    "read_secrets",
    "recovery_keys_changed",
    "require_permission",
    "same_definition",
    "secret_json",
    "update_manifest",
    "user_permissions",
    "write_secrets",
]

Rng = Callable[[int], bytes]

ALL_ACKNOWLEDGED = "All users have acknowledged the update manifest. Update successfully applied"
CANCELLED = "Update successfully cancelled"
UPDATE_IN_PROGRESS = (
    "update already in progress: acknowledge or cancel the pending update first "
    "(marblekeep manifest update get / acknowledge / cancel)"
)
_DEFAULT_IPS = frozenset({"127.0.0.1", "::1"})

# Update-log messages and field names: MarbleRun's exactly (reference §9.1).
LOG_INITIAL = "Initial manifest set"
LOG_SVN = "SecurityVersion increased"
LOG_SECRET_SET = "Secret set"  # noqa: S105 (a log message)
#: Written by marblekeep before secret reads moved to the audit trail; older logs may hold it.
LOG_SECRET_READ = "Secret read"  # noqa: S105 (a log message)
LOG_INITIATED_DONE = "Complete Manifest update initiated by user. No further acknowledgements required"
LOG_INITIATED_WAIT = (
    "Complete Manifest update initiated by user. Waiting for acknowledgments to apply the update"
)
LOG_ACKNOWLEDGED = "Complete Manifest update acknowledged by user"
LOG_APPLIED = "Complete Manifest updated"
LOG_CANCELLED = "Complete Manifest update cancelled by user"
LOG_APPLY_FAILED = "Complete Manifest update cancelled due to error during apply"


class Permission(enum.StrEnum):
    """Permission IDs: a role's actions, lower-cased (MarbleRun's ``coordinator/user``)."""

    READ_SECRET = "readsecret"  # noqa: S105 (a permission name)
    WRITE_SECRET = "writesecret"  # noqa: S105 (a permission name)
    UPDATE_SECURITY_VERSION = "updatesecurityversion"
    UPDATE_MANIFEST = "updatemanifest"


_PERMISSION_NAMES = {
    Permission.READ_SECRET: "ReadSecret",
    Permission.WRITE_SECRET: "WriteSecret",
    Permission.UPDATE_SECURITY_VERSION: "UpdateSecurityVersion",
    Permission.UPDATE_MANIFEST: "UpdateManifest",
}


class UpdateKind(enum.Enum):
    PACKAGE = "package"
    FULL = "full"


# ---------------------------------------------------------------------------------- permissions


#: Memo of :func:`user_permissions` for the most recent manifest (a Manifest is immutable, so the
#: answer for one manifest object never changes); checking a permission is then O(names asked).
_permissions_memo: tuple[Manifest | None, dict[str, dict[str, frozenset[str]]]] = (None, {})


def user_permissions(manifest: Manifest, user: str) -> dict[str, frozenset[str]]:
    """permission ID → the resource names it covers, merged over every role of ``user``."""
    global _permissions_memo  # noqa: PLW0603 (a memo of a pure function)
    memo_manifest, memo = _permissions_memo
    if memo_manifest is not manifest:
        memo = {}
        _permissions_memo = (manifest, memo)
    cached = memo.get(user)
    if cached is None:
        cached = memo[user] = _user_permissions(manifest, user)
    return cached


def _user_permissions(manifest: Manifest, user: str) -> dict[str, frozenset[str]]:
    out: dict[str, set[str]] = {}
    account = manifest.users.get(user)
    if account is None:
        return {}
    for role_name in account.roles:
        role = manifest.roles.get(role_name)
        if role is None:
            continue  # validated manifests never get here
        for action in role.actions:
            out.setdefault(action.lower(), set()).update(role.resource_names)
    return {perm: frozenset(names) for perm, names in out.items()}


def is_permitted(
    manifest: Manifest, user: str, permission: Permission, resources: Iterable[str] = ()
) -> bool:
    """Whether ``user`` holds ``permission`` over every name in ``resources``."""
    granted = user_permissions(manifest, user).get(permission.value)
    return granted is not None and set(resources) <= granted


def require_permission(
    manifest: Manifest, user: str, permission: Permission, resources: Iterable[str] = ()
) -> None:
    """Raise :class:`AuthorizationError` naming what is missing unless :func:`is_permitted`."""
    wanted = sorted(set(resources))
    granted = user_permissions(manifest, user).get(permission.value)
    action = _PERMISSION_NAMES[permission]
    if granted is None:
        on = f" on {', '.join(wanted)}" if wanted else ""
        raise AuthorizationError(
            f"user {user!r} lacks {action}{on}: it holds no role with that action (give it one in the"
            " manifest)"
        )
    denied = [name for name in wanted if name not in granted]
    if denied:
        raise AuthorizationError(
            f"user {user!r} lacks {action} on {', '.join(denied)}: add them to the ResourceNames "
            "of one of its roles in the manifest"
        )


# ---------------------------------------------------------------------------------- update log


def _log(
    dep: Deployment, now: dt.datetime, events: Sequence[tuple[str, Sequence[tuple[str, FieldValue]]]]
) -> Deployment:
    """``dep`` with the entries appended to its update log and the head re-signed."""
    if not events:
        return dep
    lines = dep.update_log
    root_der = dep.ca.root.cert_der
    for message, fields in events:
        lines = append_entry(lines, root_der, now, message, fields)
    head = sign_head(dep.ca.root.key, lines)
    return dataclasses.replace(dep, update_log=lines, update_log_head=encode_head(head))


def log_initial_manifest(dep: Deployment, now: dt.datetime) -> Deployment:
    """The first entry of a deployment's log: ``Initial manifest set``."""
    return _log(dep, now, [(LOG_INITIAL, ())])


def _manifest_of(dep: Deployment) -> Manifest:
    dep.require(CoordinatorState.ACCEPTING_MARBLES)
    if dep.manifest is None:  # state 3 always has one
        raise IntegrityError("the Coordinator accepts Marbles but holds no manifest: the state is damaged")
    return dep.manifest


# ---------------------------------------------------------------------------------- secrets


def _b64_or_none(data: bytes | None) -> str | None:
    return base64.b64encode(data).decode() if data else None


def secret_json(secret: Secret) -> dict[str, Any]:
    """MarbleRun's Secret JSON as ``GET /api/v2/secrets`` returns it (capitalised keys, base64)."""
    return {
        "Type": secret.type.value,
        "Size": secret.size,
        "Shared": secret.shared,
        "UserDefined": secret.user_defined,
        "Cert": _b64_or_none(secret.cert),
        "ValidFor": secret.valid_for,
        "Private": _b64_or_none(secret.private),
        "Public": _b64_or_none(secret.public),
    }


def read_secrets(dep: Deployment, user: str, names: Sequence[str]) -> dict[str, Secret]:
    """The secrets ``names`` for ``user`` (ReadSecret on all of them, each name once, in order).

    Unknown names are a :class:`RequestError` naming them. A read changes nothing in the state: the
    service records it in the secret-read audit trail (:mod:`marblekeep.core.readaudit`), not in the
    public update log."""
    manifest = _manifest_of(dep)
    if not names:
        raise RequestError("invalid query: endpoint requires at least one query parameter (s=NAME)")
    if any(not name for name in names):
        raise RequestError("malformed query string: empty query parameter (s= needs a secret name)")
    unique = list(dict.fromkeys(names))
    unknown = [name for name in unique if name not in manifest.secrets]
    if unknown:
        hints = "".join(did_you_mean(name, manifest.secrets) for name in unknown[:1])
        raise RequestError(
            f"s: the manifest defines no secret named {', '.join(repr(n) for n in unknown)}{hints} "
            "(names are case-sensitive)",
            problems=[
                Problem(f"s={name}", f"no such secret in the manifest{did_you_mean(name, manifest.secrets)}")
                for name in unknown
            ],
        )
    require_permission(manifest, user, Permission.READ_SECRET, unique)
    return {name: dep.secrets.get(name, manifest.secrets[name]) for name in unique}


def write_secrets(dep: Deployment, user: str, body: object, now: dt.datetime) -> Deployment:
    """Set user-defined secrets from an upload ``body`` (name → {Cert, Private, Key}).

    Order: WriteSecret on every name the manifest defines (unknown names are reported by the
    upload check), the upload check itself, then a dry run of every Marble's templates with the
    new values. All or nothing. ``.Previous`` of a written secret becomes its former value (or
    the new one if it had none), so ``.Previous`` templates work after the first upload.
    """
    manifest = _manifest_of(dep)
    if isinstance(body, Mapping):
        require_permission(
            manifest, user, Permission.WRITE_SECRET, [str(n) for n in body if str(n) in manifest.secrets]
        )
    uploaded = parse_user_secrets(body, manifest.secrets)
    secrets = {**dep.secrets, **uploaded}
    problems = dry_run(manifest, secrets)
    if problems:
        raise SecretUploadError(
            f"the new secret values would break a Marble's templates: {problems[0]}"
            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
            problems=problems,
        )
    previous = dict(dep.previous_secrets)
    for name, value in uploaded.items():
        old = dep.secrets.get(name)
        previous[name] = old if old is not None and old.has_value else value
    events = [
        (LOG_SECRET_SET, (("user", user), ("secret", name), ("type", value.type.value)))
        for name, value in uploaded.items()
    ]
    new = dataclasses.replace(dep, secrets=secrets, previous_secrets=previous)
    return _log(new, now, events)


# ---------------------------------------------------------------------------------- updates


@dataclass(frozen=True)
class UpdateOutcome:
    """What an update request did. ``deployment`` is what to commit (also when ``error`` is set:
    an update that failed to apply is cancelled and logged, then ``error`` is raised)."""

    deployment: Deployment
    kind: UpdateKind
    applied: bool
    missing_acknowledgments: int = 0
    missing_users: tuple[str, ...] = ()
    message: str = ""
    #: Set when an applied full update changed the recovery keys: recovery secrets must be reissued.
    new_recovery_manifest: Manifest | None = field(default=None, repr=False)
    error: MarbleKeepError | None = None


_FULL_UPDATE_FIELDS = ("Infrastructures", "Marbles", "Users", "RecoveryKeys", "Roles", "Secrets", "TLS")


def is_package_update(raw: bytes) -> bool:
    """MarbleRun's ``IsUpdateManifest``: no Infrastructures, Marbles, Users, RecoveryKeys, Roles,
    Secrets or TLS (empty objects count as none). ``{}`` is a package update; Config is ignored."""
    tree = parse_json(raw, "update manifest")
    if not isinstance(tree, JObject):
        raise ManifestError(
            "update manifest must be a JSON object",
            problems=[Problem("", 'send a JSON object (a manifest, or {"Packages": {...}})')],
        )
    fields = Decoder().fields(tree.pairs, _FULL_UPDATE_FIELDS)
    for values in fields.values():
        for value in values:
            if value is None or (isinstance(value, JObject) and not value.pairs):
                continue
            return False
    return True


def _root_names(root: CertifiedKey) -> list[str]:
    """The DNS names and non-default IPs of the root certificate (the intermediate gets the same)."""
    try:
        san = root.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ["localhost"]
    names: list[str] = list(san.get_values_for_type(x509.DNSName))
    names.extend(
        ip for ip in (str(a) for a in san.get_values_for_type(x509.IPAddress)) if ip not in _DEFAULT_IPS
    )
    return names or ["localhost"]


def _rotate_ca(dep: Deployment, now: dt.datetime, rng: Rng) -> CaSet:
    intermediate, marble_root = create_intermediate(dep.ca.root, _root_names(dep.ca.root), now, rng=rng)
    return CaSet(root=dep.ca.root, intermediate=intermediate, marble_root=marble_root)


def _check_package_update(dep: Deployment, manifest: Manifest, update: Manifest) -> dict[str, int]:
    """MarbleRun's ``CheckUpdate``: package name → new SecurityVersion, or every problem."""
    problems: list[Problem] = []
    out: dict[str, int] = {}
    if not update.packages:
        raise ManifestError(
            "update manifest: no packages defined",
            problems=[Problem("Packages", "list the packages whose SecurityVersion to raise")],
        )
    for name, package in update.packages.items():
        path = f"Packages.{name}"
        current = manifest.packages.get(name)
        if current is None:
            problems.append(
                Problem(
                    path, "the update manifest names a package which the original manifest does not contain"
                )
            )
            continue
        fixed = [
            label
            for label, given in (
                ("Debug", package.debug),
                ("UniqueID", package.unique_id),
                ("SignerID", package.signer_id),
                ("ProductID", package.product_id is not None),
                ("TDX", package.tdx is not None),
            )
            if given
        ]
        if fixed:
            problems.append(
                Problem(
                    path,
                    f"unupdatable values in the update manifest ({', '.join(fixed)}): a package "
                    "update may only raise SecurityVersion (use a full manifest update for the rest)",
                )
            )
            continue
        if package.security_version is None:
            problems.append(
                Problem(f"{path}.SecurityVersion", "the update manifest does not specify a SecurityVersion")
            )
            continue
        if current.security_version is not None and package.security_version < current.security_version:
            problems.append(
                Problem(
                    f"{path}.SecurityVersion",
                    f"update manifest tries to downgrade SecurityVersion from {current.security_version} "
                    f"to {package.security_version}",
                )
            )
            continue
        out[name] = package.security_version
    if problems:
        raise ManifestError(f"invalid package update: {problems[0]}", problems=problems)
    return out


def _package_update(dep: Deployment, user: str, raw: bytes, now: dt.datetime, rng: Rng) -> UpdateOutcome:
    manifest = _manifest_of(dep)
    parsed = parse_manifest_tree(raw, parse_json(raw, "update manifest"))
    # Permission before content (as MarbleRun), over every listed package the manifest has (no
    # role can grant one it lacks; those are reported by name below, as are all content problems).
    named = [name for name in parsed.manifest.packages if name in manifest.packages]
    require_permission(manifest, user, Permission.UPDATE_SECURITY_VERSION, named)
    if parsed.problems:
        raise ManifestError(f"update manifest is invalid: {parsed.problems[0]}", problems=parsed.problems)
    svns = _check_package_update(dep, manifest, parsed.manifest)
    packages: dict[str, Package] = dict(manifest.packages)
    for name, svn in svns.items():
        packages[name] = dataclasses.replace(packages[name], security_version=svn)
    ca = _rotate_ca(dep, now, rng)
    # Shared certificates are regenerated with the stored certificate as template (NotAfter kept).
    stored_certs = {
        n: s for n, s in dep.secrets.items() if s.shared and not s.user_defined and s.type.is_certificate
    }
    secrets = {**dep.secrets, **generate_shared_secrets(stored_certs, ca.marble_root, now, rng)}
    new = dataclasses.replace(
        dep,
        ca=ca,
        manifest=dataclasses.replace(manifest, packages=packages),
        secrets=secrets,
        package_svns={**dep.package_svns, **svns},
    )
    events = [
        (LOG_SVN, (("user", user), ("package", name), ("new version", svn))) for name, svn in svns.items()
    ]
    return UpdateOutcome(deployment=_log(new, now, events), kind=UpdateKind.PACKAGE, applied=True)


def same_definition(a: Secret, b: Secret) -> bool:
    """MarbleRun's ``EqualDefinition``: Type, Size, Shared, UserDefined, ValidFor (not Cert)."""
    return (a.type, a.size, a.shared, a.user_defined, a.valid_for) == (
        b.type,
        b.size,
        b.shared,
        b.user_defined,
        b.valid_for,
    )


def _rebase(definition: Secret, value: Secret) -> Secret:
    """``value``'s key material on the new manifest's ``definition``."""
    return dataclasses.replace(
        definition, cert=value.cert, private=value.private, public=value.public, valid_for=value.valid_for
    )


def _random(rng: Rng, size: int) -> bytes:
    value = rng(size)
    if len(value) != size:
        raise IntegrityError("the random source returned fewer bytes than requested")
    return value


def apply_full_update(
    dep: Deployment, manifest: Manifest, now: dt.datetime, rng: Rng = os.urandom
) -> Deployment:
    """Apply a full update (MarbleRun's ``updateApply`` / ``updateSecrets``, reference §3.5).

    Secrets the new manifest drops are deleted (current and previous). A changed definition
    (:func:`same_definition`) counts as removed and added: a user-defined secret is reset to the
    manifest's initial value (usually none), a generated one is generated afresh. Unchanged
    user-defined secrets keep their values; unchanged symmetric keys too, unless
    ``RotateRootSecret`` is set; every other unchanged generated secret moves to ``.Previous`` and
    is regenerated from the new definition (shared certificates from the manifest's template).
    ``RotateRootSecret`` keeps the old root secret as the previous one. The intermediate CA and the
    Marble root rotate; root CA, seal master secret and activation counters stay. The raw manifest
    is stored and signed; package-update SVNs and the pending update are dropped.
    """
    old_manifest = dep.manifest
    assert old_manifest is not None
    rotate = manifest.config.rotate_root_secret
    root_secret, previous_root = dep.root_secret, dep.previous_root_secret
    if rotate:
        previous_root, root_secret = dep.root_secret, _random(rng, 32)
    ca = _rotate_ca(dep, now, rng)
    secrets: dict[str, Secret] = {}
    previous: dict[str, Secret] = {}
    regenerate: dict[str, Secret] = {}
    for name, definition in manifest.secrets.items():
        old_definition = old_manifest.secrets.get(name)
        current = dep.secrets.get(name)
        if old_definition is None or current is None or not same_definition(old_definition, definition):
            if definition.user_defined:
                secrets[name] = previous[name] = definition
            else:
                regenerate[name] = definition
            continue
        if definition.user_defined or (definition.type is SecretType.SYMMETRIC_KEY and not rotate):
            secrets[name] = _rebase(definition, current)
            previous[name] = _rebase(definition, dep.previous_secrets.get(name, current))
            continue
        previous[name] = _rebase(definition, current)
        regenerate[name] = definition
    generated = generate_shared_secrets(regenerate, ca.marble_root, now, rng)
    for name, definition in regenerate.items():
        value = generated.get(name, definition)  # per-Marble secrets: their definition
        secrets[name] = value
        previous.setdefault(name, value)
    problems = dry_run(manifest, secrets)
    if problems:
        raise ManifestError(f"the update would break a Marble's templates: {problems[0]}", problems=problems)
    return dataclasses.replace(
        dep,
        ca=ca,
        root_secret=root_secret,
        previous_root_secret=previous_root,
        manifest=manifest,
        manifest_signature=sign_manifest(dep.ca.root.key, manifest.raw),
        secrets=secrets,
        previous_secrets=previous,
        pending_update=None,
        package_svns={},
    )


def recovery_keys_changed(old: Manifest, new: Manifest) -> bool:
    """MarbleRun's ``recoveryKeysHaveChanged``: a different number of keys; or equal (or
    equivalent: 0 and n) thresholds with different PEMs; or different thresholds."""
    old_keys, new_keys = old.recovery_keys, new.recovery_keys
    if len(old_keys) != len(new_keys):
        return True
    n = len(new_keys)

    def effective(threshold: int) -> int:
        return n if threshold == 0 else threshold

    if effective(old.config.recovery_threshold) == effective(new.config.recovery_threshold):
        return dict(old_keys) != dict(new_keys)
    return True


def _ack_message(pending: PendingUpdate) -> str:
    if pending.missing == 0:
        return ALL_ACKNOWLEDGED
    return (
        f"{pending.missing} user(s) still need(s) to acknowledge the update manifest.\n"
        f"The following users have not yet accepted: {', '.join(pending.missing_users)}"
    )


def _waiting(dep: Deployment, pending: PendingUpdate) -> UpdateOutcome:
    """A full update that still waits for acknowledgements."""
    return UpdateOutcome(
        deployment=dep,
        kind=UpdateKind.FULL,
        applied=False,
        missing_acknowledgments=pending.missing,
        missing_users=pending.missing_users,
        message=_ack_message(pending),
    )


def pending_message(pending: PendingUpdate) -> str:
    """The message of ``GET /api/v2/update-manifest``."""
    if pending.missing == 1:
        return "1 user still needs to acknowledge the update manifest"
    return f"{pending.missing} users still need to acknowledge the update manifest"


def _applied(
    applied: Deployment,
    old: Manifest,
    manifest: Manifest,
    pending: PendingUpdate,
    now: dt.datetime,
    events: Sequence[tuple[str, Sequence[tuple[str, FieldValue]]]],
) -> UpdateOutcome:
    fingerprint = manifest_fingerprint(manifest.raw)
    logged = _log(applied, now, [*events, (LOG_APPLIED, (("manifestFingerprint", fingerprint),))])
    return UpdateOutcome(
        deployment=logged,
        kind=UpdateKind.FULL,
        applied=True,
        missing_acknowledgments=0,
        missing_users=pending.missing_users,
        message=ALL_ACKNOWLEDGED,
        new_recovery_manifest=manifest if recovery_keys_changed(old, manifest) else None,
    )


def _full_update(dep: Deployment, user: str, raw: bytes, now: dt.datetime, rng: Rng) -> UpdateOutcome:
    current = _manifest_of(dep)
    require_permission(current, user, Permission.UPDATE_MANIFEST)
    manifest = load_manifest(raw)
    required_users = tuple(
        sorted(u for u in current.users if is_permitted(current, u, Permission.UPDATE_MANIFEST))
    )
    required = current.config.update_threshold or len(required_users)
    pending = PendingUpdate(raw=raw, required_users=required_users, required=required, acknowledged=(user,))
    fingerprint = manifest_fingerprint(raw)
    # Apply now: at once when nothing is missing; otherwise as a trial, so that a manifest that
    # cannot be applied is refused before anyone is asked to acknowledge it. A failure here
    # writes nothing.
    applied = apply_full_update(dep, manifest, now, rng)
    if pending.missing == 0:
        initiated = (LOG_INITIATED_DONE, (("user", user), ("manifestFingerprint", fingerprint)))
        return _applied(applied, current, manifest, pending, now, [initiated])
    new = dataclasses.replace(dep, pending_update=pending)
    new = _log(
        new,
        now,
        [
            (
                LOG_INITIATED_WAIT,
                (
                    ("user", user),
                    ("manifestFingerprint", fingerprint),
                    ("missingAcknowledgments", pending.missing),
                    ("missingUsers", pending.missing_users),
                ),
            )
        ],
    )
    return _waiting(new, pending)


def update_manifest(
    dep: Deployment, user: str, raw: bytes, now: dt.datetime, rng: Rng = os.urandom
) -> UpdateOutcome:
    """``POST /api/v2/update``: a package update or the start of a full update (see module doc)."""
    _manifest_of(dep)
    if dep.pending_update is not None:
        raise StateError(UPDATE_IN_PROGRESS)
    if is_package_update(raw):
        return _package_update(dep, user, raw, now, rng)
    return _full_update(dep, user, raw, now, rng)


def _pending_of(dep: Deployment) -> PendingUpdate:
    if dep.pending_update is None:
        raise NotFoundError("no pending update: start one with `marblekeep manifest update apply`")
    return dep.pending_update


def acknowledge_update(
    dep: Deployment, user: str, raw: bytes, now: dt.datetime, rng: Rng = os.urandom
) -> UpdateOutcome:
    """``POST /api/v2/update-manifest``: ``user`` acknowledges the pending update's exact bytes."""
    pending = _pending_of(dep)
    if user not in pending.required_users:
        raise AuthorizationError(
            f"user {user!r} is not among the users who must acknowledge this update "
            f"({', '.join(pending.required_users)})"
        )
    if raw != pending.raw:
        raise RequestError(
            "manifest: differs from the pending update manifest (fingerprint "
            f"{manifest_fingerprint(raw)}, pending {manifest_fingerprint(pending.raw)}): acknowledge "
            "exactly the bytes that were proposed (`marblekeep manifest update get` shows them)",
            problems=[Problem("manifest", "not byte-identical to the pending update manifest")],
        )
    if user in pending.acknowledged:  # a repeat is a no-op
        return _waiting(dep, pending)
    pending = dataclasses.replace(pending, acknowledged=(*pending.acknowledged, user))
    fingerprint = manifest_fingerprint(raw)
    ack: tuple[str, Sequence[tuple[str, FieldValue]]] = (
        LOG_ACKNOWLEDGED,
        (
            ("user", user),
            ("missingAcknowledgments", pending.missing),
            ("missingUsers", pending.missing_users),
            ("manifestFingerprint", fingerprint),
        ),
    )
    if pending.missing == 0:
        # The last acknowledgement applies the update. A failure (the manifest was checked at
        # initiation, so only time-dependent values can fail now) cancels it, as MarbleRun does.
        old = dep.manifest
        assert old is not None
        try:
            manifest = load_manifest(raw)
            applied = apply_full_update(dep, manifest, now, rng)
        except MarbleKeepError as exc:
            cancelled = _log(
                dataclasses.replace(dep, pending_update=None),
                now,
                [ack, (LOG_APPLY_FAILED, (("manifestFingerprint", fingerprint),))],
            )
            error = type(exc)(
                f"the update could not be applied and was cancelled: {exc.message}", problems=exc.problems
            )
            return UpdateOutcome(cancelled, UpdateKind.FULL, applied=False, error=error)
        return _applied(applied, old, manifest, pending, now, [ack])
    new = _log(dataclasses.replace(dep, pending_update=pending), now, [ack])
    return _waiting(new, pending)


def cancel_update(dep: Deployment, user: str, now: dt.datetime) -> Deployment:
    """``POST /api/v2/update-cancel``: needs UpdateManifest (checked first), then a pending update."""
    manifest = dep.manifest
    if manifest is None:
        raise StateError("no manifest has been set yet: there is no update to cancel")
    require_permission(manifest, user, Permission.UPDATE_MANIFEST)
    pending = _pending_of(dep)
    new = dataclasses.replace(dep, pending_update=None)
    return _log(
        new,
        now,
        [(LOG_CANCELLED, (("user", user), ("manifestFingerprint", manifest_fingerprint(pending.raw))))],
    )


# ---------------------------------------------------------------------------------- consolidation


def consolidate_manifest(raw: bytes, log_lines: Sequence[str]) -> bytes:
    """The manifest with the SecurityVersions of later package updates applied, as
    ``marblerun manifest get --display-update`` shows it: each ``SecurityVersion increased``
    entry of the log sets ``Packages.<package>.SecurityVersion`` to its ``new version``.

    Raises :class:`RequestError` when ``raw`` is not a JSON object.
    """
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise RequestError("the manifest is not valid JSON") from None
    if not isinstance(doc, dict):
        raise RequestError("the manifest is not a JSON object")
    packages_key = next((k for k in doc if k == "Packages"), None) or next(
        (k for k in doc if k.lower() == "packages"), None
    )
    packages = doc.get(packages_key) if packages_key is not None else None
    if not isinstance(packages, dict):
        return raw
    changed = False
    for line in log_lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or entry.get("update") != LOG_SVN:
            continue
        name, version = entry.get("package"), entry.get("new version")
        if (
            not isinstance(name, str)
            or not isinstance(version, int)
            or not isinstance(packages.get(name), dict)
        ):
            continue
        package = packages[name]
        key = next((k for k in package if k.lower() == "securityversion"), "SecurityVersion")
        package[key] = version
        changed = True
    if not changed:
        return raw
    return json.dumps(doc, indent=2).encode() + b"\n"
