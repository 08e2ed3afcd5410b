"""How a :class:`~marblekeep.core.deployment.Deployment` is laid out as store records.

One record per item, so a commit writes only what changed (a secret upload writes one record,
an activation of a limited Marble one counter). Key names follow MarbleRun's store keys where one
exists (reference §7.1); values are bytes and pass the encryption barrier of the store.

========================================  ===========================================================
key                                       value
========================================  ===========================================================
``state``                                 decimal ASCII state number
``manifest``                              the raw manifest bytes exactly as uploaded
``manifestSignature``                     DER ECDSA signature by the root key over SHA-256(manifest)
``certificate:<coordinatorRootCert|...>`` DER certificates (root, intermediate, Marble root)
``privateKey:<coordinatorRootKey|...>``   PKCS#8 DER private keys (root, intermediate = Marble root)
``rootSecret`` / ``previousRootSecret``   32 bytes
``sealMasterSecret``                      32 bytes; never rotated
``secret:<name>`` / ``previousSecret:``   JSON of the secret's value (definition comes from manifest)
``activations:<type>``                    hexadecimal ASCII count (as MarbleRun)
``monotonicCounter:<id>``                 8-byte little-endian value of a Marble's monotonic counter;
                                          ``<id>`` = base64(type):base64(UUID bytes):base64(name)
``updateLog:<seq, 10 digits>``            one update-log entry (a JSON line; docs/governance.md)
``updateLogHead``                         the log's head signed by the root key (JSON)
``pendingUpdate``                         JSON of the pending full update (raw manifest, users, acks)
``packageSecurityVersion:<package>``      decimal SecurityVersion raised by a package update; applied
                                          over the stored raw manifest's package on load
========================================  ===========================================================
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import itertools
import json
import operator
import re
from collections.abc import Callable, Mapping
from typing import Any

from marblekeep.core.deployment import CaSet, CoordinatorState, Deployment, PendingUpdate
from marblekeep.crypto.pki import CertifiedKey
from marblekeep.errors import IntegrityError, ManifestError
from marblekeep.manifest import load_manifest
from marblekeep.manifest.model import Manifest, Secret

__all__ = ["deployment_changes", "deployment_from_records", "deployment_to_records", "record_changes"]

K_STATE = "state"
K_MANIFEST = "manifest"
K_SIGNATURE = "manifestSignature"
K_ROOT_CERT = "certificate:coordinatorRootCert"
K_INTERMEDIATE_CERT = "certificate:coordinatorIntermediateCert"
K_MARBLE_ROOT_CERT = "certificate:marbleRootCert"
K_ROOT_KEY = "privateKey:coordinatorRootKey"
K_INTERMEDIATE_KEY = "privateKey:coordinatorIntermediateKey"
K_ROOT_SECRET = "rootSecret"  # noqa: S105 (a record name, not a secret)
K_PREVIOUS_ROOT_SECRET = "previousRootSecret"  # noqa: S105
K_SEAL_MASTER = "sealMasterSecret"
P_SECRET = "secret:"  # noqa: S105
P_PREVIOUS_SECRET = "previousSecret:"  # noqa: S105
P_ACTIVATIONS = "activations:"
P_COUNTER = "monotonicCounter:"
P_UPDATE_LOG = "updateLog:"
K_UPDATE_LOG_HEAD = "updateLogHead"
K_PENDING_UPDATE = "pendingUpdate"
P_PACKAGE_SVN = "packageSecurityVersion:"
SECRET_SIZE = 32  # rootSecret, previousRootSecret, sealMasterSecret
_HEX_COUNT = re.compile(rb"[0-9a-fA-F]{1,16}")


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode()


def _secret_value(secret: Secret) -> bytes:
    return json.dumps(
        {
            "Cert": _b64(secret.cert),
            "Private": _b64(secret.private),
            "Public": _b64(secret.public),
            "ValidFor": secret.valid_for,
        },
        sort_keys=True,
    ).encode()


def _ca_records(ca: CaSet) -> dict[str, bytes]:
    return {
        K_ROOT_CERT: ca.root.cert_der,
        K_INTERMEDIATE_CERT: ca.intermediate.cert_der,
        K_MARBLE_ROOT_CERT: ca.marble_root.cert_der,
        K_ROOT_KEY: ca.root.key_pkcs8_der(),
        K_INTERMEDIATE_KEY: ca.intermediate.key_pkcs8_der(),
    }


def _fixed_records(dep: Deployment) -> dict[str, bytes]:
    """The single records (everything but the CA and the keyed sections)."""
    out: dict[str, bytes] = {
        K_STATE: str(int(dep.state)).encode(),
        K_ROOT_SECRET: dep.root_secret,
        K_SEAL_MASTER: dep.seal_master_secret,
    }
    if dep.previous_root_secret is not None:
        out[K_PREVIOUS_ROOT_SECRET] = dep.previous_root_secret
    if dep.manifest is not None:
        out[K_MANIFEST] = dep.manifest.raw
        out[K_SIGNATURE] = dep.manifest_signature
    if dep.update_log_head:
        out[K_UPDATE_LOG_HEAD] = dep.update_log_head
    if dep.pending_update is not None:
        out[K_PENDING_UPDATE] = _pending_value(dep.pending_update)
    return out


def _count_value(count: int) -> bytes:
    return f"{count:x}".encode()


def _counter_value(value: int) -> bytes:
    return value.to_bytes(8, "little")


def _svn_value(svn: int) -> bytes:
    return str(svn).encode()


def _log_key(seq: int) -> str:
    return f"{P_UPDATE_LOG}{seq:010d}"


def _sections(dep: Deployment) -> list[tuple[str, Mapping[str, Any], Callable[[Any], bytes]]]:
    """The keyed sections: (record prefix, the mapping, how one value is encoded)."""
    return [
        (P_SECRET, dep.secrets, _secret_value),
        (P_PREVIOUS_SECRET, dep.previous_secrets, _secret_value),
        (P_ACTIVATIONS, dep.activations, _count_value),
        (P_COUNTER, dep.counters, _counter_value),
        (P_PACKAGE_SVN, dep.package_svns, _svn_value),
    ]


def deployment_to_records(dep: Deployment) -> dict[str, bytes]:
    """Every record of ``dep``."""
    out = _fixed_records(dep)
    out.update(_ca_records(dep.ca))
    for prefix, mapping, encode in _sections(dep):
        for name, value in mapping.items():
            out[prefix + name] = encode(value)
    for seq, line in enumerate(dep.update_log, start=1):
        out[_log_key(seq)] = line.encode("utf-8")
    return out


def deployment_changes(old: Deployment | None, new: Deployment) -> dict[str, bytes | None]:
    """The writes that turn the records of ``old`` into those of ``new`` (None = delete).

    Equal to ``record_changes(deployment_to_records(old), deployment_to_records(new))``, but it
    only encodes what changed: sections and entries that are the same objects are skipped, and the
    update log is append-only. A commit therefore costs what it changes, not the size of the state.
    """
    if old is None:
        return dict(deployment_to_records(new))
    changes = record_changes(_fixed_records(old), _fixed_records(new))
    if old.ca is not new.ca:
        changes.update(record_changes(_ca_records(old.ca), _ca_records(new.ca)))
    for (prefix, before, encode), (_, after, _) in zip(_sections(old), _sections(new), strict=True):
        if before is after:
            continue
        changed, removed = _candidates(before, after)
        for name in changed:
            value = after[name]
            previous = before.get(name, _MISSING)
            encoded = encode(value)
            if previous is _MISSING or encode(previous) != encoded:
                changes[prefix + name] = encoded
        for name in removed:
            changes[prefix + name] = None
    if old.update_log is not new.update_log:
        n = len(old.update_log)
        if new.update_log[:n] == old.update_log:
            for seq in range(n + 1, len(new.update_log) + 1):
                changes[_log_key(seq)] = new.update_log[seq - 1].encode("utf-8")
        else:  # not an append: rewrite the log records
            old_log = {_log_key(i): line.encode("utf-8") for i, line in enumerate(old.update_log, start=1)}
            new_log = {_log_key(i): line.encode("utf-8") for i, line in enumerate(new.update_log, start=1)}
            changes.update(record_changes(old_log, new_log))
    return changes


_MISSING = object()


def _candidates(before: Mapping[str, Any], after: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(names in ``after`` whose value is not the very object ``before`` holds, names removed).

    Fast path, at C speed, for the common commit (some values replaced, no name added or removed,
    order kept as ``{**old, **changes}`` keeps it): compare the values pairwise by identity.
    """
    names = list(after)
    if names == list(before):
        return list(itertools.compress(names, map(operator.is_not, before.values(), after.values()))), []
    changed = [name for name in names if before.get(name, _MISSING) is not after[name]]
    return changed, [name for name in before if name not in after]


def _pending_value(pending: PendingUpdate) -> bytes:
    return json.dumps(
        {
            "manifestRaw": base64.b64encode(pending.raw).decode(),
            "requiredUsers": list(pending.required_users),
            "required": pending.required,
            "acknowledged": list(pending.acknowledged),
        }
    ).encode()


def _load_pending(value: bytes) -> PendingUpdate:
    try:
        doc = json.loads(value)
    except ValueError:
        raise _damaged(K_PENDING_UPDATE) from None
    if not isinstance(doc, dict):
        raise _damaged(K_PENDING_UPDATE)
    users, acked, required = doc.get("requiredUsers"), doc.get("acknowledged"), doc.get("required")
    if (
        not isinstance(users, list)
        or not isinstance(acked, list)
        or not all(isinstance(u, str) for u in (*users, *acked))
        or not isinstance(required, int)
        or isinstance(required, bool)
    ):
        raise _damaged(K_PENDING_UPDATE)
    return PendingUpdate(
        raw=_unb64(doc.get("manifestRaw"), K_PENDING_UPDATE),
        required_users=tuple(users),
        required=required,
        acknowledged=tuple(acked),
    )


def _load_governance(
    records: Mapping[str, bytes], manifest: Manifest
) -> tuple[Manifest, dict[str, int], tuple[str, ...]]:
    """The manifest with package-update SVNs applied, those SVNs, and the update log in order."""
    svns: dict[str, int] = {}
    log: list[tuple[str, str]] = []
    for key, value in records.items():
        if key.startswith(P_PACKAGE_SVN):
            name = key[len(P_PACKAGE_SVN) :]
            try:
                svns[name] = int(value.decode("ascii"))
            except (ValueError, UnicodeDecodeError):
                raise _damaged(key) from None
            if name not in manifest.packages or svns[name] < 0:
                raise _damaged(key)
        elif key.startswith(P_UPDATE_LOG):
            try:
                log.append((key, value.decode("utf-8")))
            except UnicodeDecodeError:
                raise _damaged(key) from None
    if svns:
        packages = dict(manifest.packages)
        for name, svn in svns.items():
            packages[name] = dataclasses.replace(packages[name], security_version=svn)
        manifest = dataclasses.replace(manifest, packages=packages)
    # Entries are loaded as stored, even if someone removed or reordered them: `log verify`
    # reports such damage against the signed head instead of the Coordinator refusing to start.
    return manifest, svns, tuple(line for _, line in sorted(log))


def record_changes(old: Mapping[str, bytes], new: Mapping[str, bytes]) -> dict[str, bytes | None]:
    """The writes that turn ``old`` into ``new`` (None = delete)."""
    changes: dict[str, bytes | None] = {k: v for k, v in new.items() if old.get(k) != v}
    changes.update({k: None for k in old if k not in new})
    return changes


def _damaged(what: str) -> IntegrityError:
    return IntegrityError(f"stored record {what} is damaged: restore a backup or recover the Coordinator")


def _unb64(value: object, what: str) -> bytes:
    if value is None:
        return b""
    if not isinstance(value, str):
        raise _damaged(what)
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise _damaged(what) from None


def _load_secrets(records: Mapping[str, bytes], prefix: str, manifest: Manifest) -> dict[str, Secret]:
    out: dict[str, Secret] = {}
    for key, value in records.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        definition = manifest.secrets.get(name)
        if definition is None:
            raise _damaged(key)
        try:
            doc = json.loads(value)
        except ValueError:
            raise _damaged(key) from None
        if not isinstance(doc, dict) or not isinstance(doc.get("ValidFor", 0), int):
            raise _damaged(key)
        cert = doc.get("Cert")
        out[name] = dataclasses.replace(
            definition,
            cert=None if cert is None else _unb64(cert, key),
            private=_unb64(doc.get("Private"), key),
            public=_unb64(doc.get("Public"), key),
            valid_for=doc.get("ValidFor", 0),
        )
    return out


#: Record-key prefixes of the counts that activations and monotonic counters change.
COUNT_PREFIXES = (P_ACTIVATIONS, P_COUNTER)


def counts_from_records(records: Mapping[str, bytes]) -> tuple[dict[str, int], dict[str, int]]:
    """The ``activations:`` and ``monotonicCounter:`` records as (activations, counters).

    Raises :class:`IntegrityError` naming a malformed record."""
    activations: dict[str, int] = {}
    counters: dict[str, int] = {}
    for key, value in records.items():
        if key.startswith(P_ACTIVATIONS):
            if not _HEX_COUNT.fullmatch(value):
                raise _damaged(key)
            activations[key[len(P_ACTIVATIONS) :]] = int(value, 16)
        elif key.startswith(P_COUNTER):
            if len(value) != 8:
                raise _damaged(key)
            counters[key[len(P_COUNTER) :]] = int.from_bytes(value, "little")
    return activations, counters


def deployment_from_records(records: Mapping[str, bytes]) -> Deployment | None:
    """Rebuild the deployment from its records; None when the store holds no deployment yet.

    Raises :class:`IntegrityError` naming the record when something is missing or malformed.
    """
    if K_STATE not in records:
        return None

    def need(key: str) -> bytes:
        value = records.get(key)
        if value is None:
            raise IntegrityError(
                f"stored record {key} is missing: restore a backup or recover the Coordinator"
            )
        return value

    def pair(cert_key: str, key_key: str) -> CertifiedKey:
        cert_der, key_der = need(cert_key), need(key_key)
        try:
            return CertifiedKey.from_der(cert_der, key_der)
        except IntegrityError:
            raise IntegrityError(
                f"stored records {cert_key} and {key_key} do not form a P-384 certificate and its key: "
                "restore a backup or recover the Coordinator"
            ) from None

    def secret32(key: str, value: bytes) -> bytes:
        if len(value) != SECRET_SIZE:
            raise _damaged(key)
        return value

    try:
        state = CoordinatorState(int(need(K_STATE).decode("ascii")))
    except (ValueError, UnicodeDecodeError):
        raise _damaged(K_STATE) from None
    ca = CaSet(
        root=pair(K_ROOT_CERT, K_ROOT_KEY),
        intermediate=pair(K_INTERMEDIATE_CERT, K_INTERMEDIATE_KEY),
        marble_root=pair(K_MARBLE_ROOT_CERT, K_INTERMEDIATE_KEY),
    )
    root_secret = secret32(K_ROOT_SECRET, need(K_ROOT_SECRET))
    seal_master_secret = secret32(K_SEAL_MASTER, need(K_SEAL_MASTER))
    previous_root_secret = records.get(K_PREVIOUS_ROOT_SECRET)
    if previous_root_secret is not None:
        secret32(K_PREVIOUS_ROOT_SECRET, previous_root_secret)
    if state is CoordinatorState.ACCEPTING_MARBLES:
        need(K_MANIFEST)  # Marbles are only accepted under a manifest
    manifest: Manifest | None = None
    secrets: dict[str, Secret] = {}
    previous: dict[str, Secret] = {}
    activations: dict[str, int] = {}
    counters: dict[str, int] = {}
    svns: dict[str, int] = {}
    update_log: tuple[str, ...] = ()
    pending: PendingUpdate | None = None
    if K_MANIFEST in records:
        try:
            manifest = load_manifest(records[K_MANIFEST])
        except ManifestError as exc:
            raise IntegrityError(
                f"stored manifest no longer validates ({exc.message}); restore a backup"
            ) from None
        manifest, svns, update_log = _load_governance(records, manifest)
        if K_PENDING_UPDATE in records:
            pending = _load_pending(records[K_PENDING_UPDATE])
        need(K_SIGNATURE)
        secrets = _load_secrets(records, P_SECRET, manifest)
        for name in manifest.secrets:
            if name not in secrets:  # every manifest secret has a value or its definition stored
                need(P_SECRET + name)
        previous = _load_secrets(records, P_PREVIOUS_SECRET, manifest)
        activations, counters = counts_from_records(records)
    return Deployment(
        state=state,
        ca=ca,
        root_secret=root_secret,
        seal_master_secret=seal_master_secret,
        previous_root_secret=previous_root_secret,
        manifest=manifest,
        manifest_signature=records.get(K_SIGNATURE, b""),
        secrets=secrets,
        previous_secrets=previous,
        activations=activations,
        counters=counters,
        update_log=update_log,
        update_log_head=records.get(K_UPDATE_LOG_HEAD, b""),
        pending_update=pending,
        package_svns=svns,
    )
