"""The template dry run (reference §2.5): would every Marble's Files and Env render, and how big?

Run when a manifest is set or updated and when user-defined secrets are uploaded. Every
template is parsed with its function set (``Files``: raw allowed; ``Env``: string allowed) and
executed against placeholders with the shape of the real values, as MarbleRun's dry run, and with
their **realistic size** (made of ``"A"`` bytes), so that the size of what a Marble receives can be
checked before any Marble starts:

* the reserved certificates have no public or private part (``MarbleCert`` also has a placeholder
  public and private key) and are as long as the Coordinator's real ones (a ``pem`` of one is about
  1 KB); the seal key is 32 bytes;
* a secret with a real value passed in *secrets* (updates, the upload dry run) is used as is;
* otherwise a placeholder by type: certificate types (``cert-*``) and user-defined secrets get a
  certificate, a public and a private part; generated symmetric keys (and any other generated
  secret) get a public and a private part only. So ``{{ pem .Secrets.key.Cert }}`` on a symmetric
  key is refused when the manifest is set, not at every activation. Their lengths follow the type
  and ``Size`` (an RSA-4096 private key about 2.4 KB); a ``plain`` secret not uploaded yet is 1 byte.

``.Previous.Secrets`` is the same map.

Each Marble's rendered Parameters (Files, Env and Argv, names and values, plus an allowance for
the variables the Coordinator adds) must stay within :data:`~.limits.MAX_PARAMETERS_BYTES`, and
the templates of the whole manifest within :data:`~.limits.MAX_TEMPLATE_ACTIONS`; rendering
stops as soon as a limit is passed, so a hostile manifest costs bounded work.

The Env NUL rule applies before templating and even to ``NoTemplates`` entries: environment
values cannot carry a NUL byte. Problems name the Marble and the file or variable; they never
contain secret values. Nothing here does I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

from marblekeep.errors import ManifestError, Problem, RenderLimitError
from marblekeep.manifest.limits import (
    MAX_PARAMETERS_BYTES,
    MAX_TEMPLATE_ACTIONS,
    PREDEFINED_ENV_ALLOWANCE,
    TTLS_ENTRY_ALLOWANCE,
)
from marblekeep.manifest.model import Manifest, Marble, Secret, SecretType
from marblekeep.templating import FunctionSet, RenderBudget, ReservedSecret, TemplateData, render_size

__all__ = ["dry_run", "placeholder"]

_DUMMY = b"A"
_DUMMY_SEAL_KEY = b"A" * 32
# Sizes of the Coordinator's real credentials (DER): P-384 CA certificates, a Marble leaf with a
# few SANs, its P-384 public key (PKIX) and private key (PKCS#8).
_CA_CERT = 600
_LEAF_CERT, _LEAF_PUBLIC, _LEAF_PRIVATE = 700, 120, 185


def _a(n: int) -> bytes:
    return b"A" * max(1, n)


def _sizes(secret: Secret) -> tuple[int, int, int]:
    """(certificate, public, private) lengths of a real value of ``secret``'s type and size."""
    kind = secret.type
    if kind is SecretType.SYMMETRIC_KEY:
        key = secret.size // 8 or 32
        return 1, key, key
    if kind is SecretType.CERT_RSA:
        n = max(secret.size, 2048) // 8
        return 2 * n + 450, n + 38, n * 19 // 4 + 30
    if kind is SecretType.CERT_ECDSA:
        k = (max(secret.size, 256) + 7) // 8
        return 4 * k + 450, 2 * k + 30, 3 * k + 70
    if kind is SecretType.CERT_ED25519:
        return 450, 44, 48
    return 1, 1, 1  # plain: its size is only known once uploaded


class _DryRunSecrets(Mapping[str, Secret]):
    """The manifest's secrets as the dry run sees them: the real value where one is given, else a
    dummy. Built on access, so a dry run costs what the templates use, not the number of secrets."""

    def __init__(self, manifest: Manifest, real: Mapping[str, Secret]) -> None:
        self._defs = manifest.secrets
        self._real = real
        self._cache: dict[str, Secret] = {}

    def __getitem__(self, name: str) -> Secret:
        value = self._cache.get(name)
        if value is None:
            secret = self._defs[name]
            given = self._real.get(name)
            value = given if given is not None and given.has_value else placeholder(secret)
            self._cache[name] = value
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._defs)

    def __len__(self) -> int:
        return len(self._defs)


def placeholder(secret: Secret) -> Secret:
    """The dry run's stand-in for a secret without a value: the shape of its real value.

    Certificate types and user-defined secrets (whose upload may carry a certificate) get a
    certificate, a public and a private part; a generated symmetric key has no certificate. Each
    part is as long as a real value's (:func:`_sizes`).
    """
    cert, public, private = _sizes(secret)
    if secret.user_defined or secret.type.is_certificate:
        return dataclasses.replace(secret, cert=_a(cert), public=_a(public), private=_a(private))
    return dataclasses.replace(secret, cert=None, public=_a(public), private=_a(private))


def _dummy_data(manifest: Manifest, secrets: Mapping[str, Secret] | None) -> TemplateData:
    values = _DryRunSecrets(manifest, secrets or {})
    reserved = ReservedSecret(cert=_a(_CA_CERT))
    return TemplateData(
        root_ca=reserved,
        marble_cert=ReservedSecret(cert=_a(_LEAF_CERT), public=_a(_LEAF_PUBLIC), private=_a(_LEAF_PRIVATE)),
        coordinator_root=reserved,
        coordinator_intermediate=reserved,
        seal_key=_DUMMY_SEAL_KEY,
        secrets=values,
        previous_secrets=values,
    )


def _coordinator_additions(manifest: Manifest, marble: Marble) -> int:
    """What the dry run counts for the variables the Coordinator adds to every Marble's Env."""
    tags = [manifest.tls[t] for t in marble.tls if t in manifest.tls]
    entries = sum(len(tag.incoming) + len(tag.outgoing) for tag in tags)
    return PREDEFINED_ENV_ALLOWANCE + (TTLS_ENTRY_ALLOWANCE * max(1, entries) if marble.tls else 0)


def _too_large(base: str, marble_name: str) -> Problem:
    return Problem(
        base,
        f"Marble {marble_name!r} renders Parameters (Files, Env and Argv) of more than the limit of "
        f"{MAX_PARAMETERS_BYTES} bytes: it could not be activated (MarbleRun's premains cannot receive "
        "more either); deliver large data another way, e.g. from a volume, and keep secrets small",
    )


def _too_many_actions(path: str) -> Problem:
    return Problem(
        path,
        f"the manifest's templates have more than the limit of {MAX_TEMPLATE_ACTIONS} actions "
        "({{ ... }}) in all: use fewer template actions",
    )


def dry_run(manifest: Manifest, secrets: Mapping[str, Secret] | None = None) -> list[Problem]:
    """Render every Marble's Files and Env against placeholders; return every problem found.

    *secrets* holds real values to use instead of placeholders (for the secret-upload dry run).
    Rendering a Marble stops at its first entry past a limit (see the module docstring).
    """
    data = _dummy_data(manifest, secrets)
    problems: list[Problem] = []
    actions = RenderBudget(max_bytes=0, max_actions=MAX_TEMPLATE_ACTIONS)
    for marble_name, marble in manifest.marbles.items():
        base = f"Marbles.{marble_name}.Parameters"
        params = marble.parameters
        budget = RenderBudget(max_bytes=MAX_PARAMETERS_BYTES, max_actions=actions.actions)
        budget.bytes -= _coordinator_additions(manifest, marble) + sum(len(a.encode()) for a in params.argv)
        entries = [(f"{base}.Files.{n}", n, e, FunctionSet.FILES) for n, e in params.files.items()]
        entries += [(f"{base}.Env.{n}", n, e, FunctionSet.ENV) for n, e in params.env.items()]
        for path, name, entry, functions in entries:
            if functions is FunctionSet.ENV and b"\x00" in entry.data:
                problems.append(
                    Problem(path, "contains a NUL byte, which an environment variable cannot hold: remove it")
                )
                continue
            budget.bytes -= len(name.encode())
            if entry.no_templates:
                budget.bytes -= len(entry.data)
            else:
                try:
                    render_size(
                        entry.data,
                        functions,
                        data,
                        budget,
                        max_bytes=MAX_PARAMETERS_BYTES,
                        max_actions=MAX_TEMPLATE_ACTIONS,
                    )
                except RenderLimitError:
                    budget.bytes = min(budget.bytes, -1)
                except ManifestError as exc:  # TemplateError and anything else from our tree
                    problems.append(Problem(path, f"template: {exc.message}"))
                actions.actions = budget.actions
            if actions.actions < 0:
                problems.append(_too_many_actions(path))
                return problems
            if budget.bytes < 0:
                problems.append(_too_large(base, marble_name))
                break
    return problems
