"""The template dry run (reference §2.5): would every Marble's Files and Env render?

Run when a manifest is set or updated and when user-defined secrets are uploaded. Every
template is parsed with its function set (``Files``: raw allowed; ``Env``: string allowed) and
executed against placeholders with the shape of the real values, as MarbleRun's dry run:

* the reserved certificates are ``b"A"`` with no public or private part (``MarbleCert`` also has
  a placeholder public and private key); the seal key is 32 bytes;
* a secret with a real value passed in *secrets* (updates, the upload dry run) is used as is;
* otherwise a placeholder by type: certificate types (``cert-*``) and user-defined secrets get a
  certificate, a public and a private part; generated symmetric keys (and any other generated
  secret) get a public and a private part only. So ``{{ pem .Secrets.key.Cert }}`` on a symmetric
  key is refused when the manifest is set, not at every activation.

``.Previous.Secrets`` is the same map.

The Env NUL rule applies before templating and even to ``NoTemplates`` entries: environment
values cannot carry a NUL byte. Problems name the Marble and the file or variable; they never
contain secret values. Nothing here does I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

from marblekeep.errors import ManifestError, Problem
from marblekeep.manifest.model import FileEntry, Manifest, Secret
from marblekeep.templating import FunctionSet, ReservedSecret, TemplateData, parse_template

__all__ = ["dry_run", "placeholder"]

_DUMMY = b"A"
_DUMMY_SEAL_KEY = b"A" * 32


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
    certificate, a public and a private part; a generated symmetric key has no certificate.
    """
    if secret.user_defined or secret.type.is_certificate:
        return dataclasses.replace(secret, cert=_DUMMY, public=_DUMMY, private=_DUMMY)
    return dataclasses.replace(secret, cert=None, public=_DUMMY, private=_DUMMY)


def _dummy_data(manifest: Manifest, secrets: Mapping[str, Secret] | None) -> TemplateData:
    values = _DryRunSecrets(manifest, secrets or {})
    reserved = ReservedSecret(cert=_DUMMY)
    return TemplateData(
        root_ca=reserved,
        marble_cert=ReservedSecret(cert=_DUMMY, public=_DUMMY, private=_DUMMY),
        coordinator_root=reserved,
        coordinator_intermediate=reserved,
        seal_key=_DUMMY_SEAL_KEY,
        secrets=values,
        previous_secrets=values,
    )


def _render(entry: FileEntry, functions: FunctionSet, data: TemplateData, path: str) -> Problem | None:
    try:
        parse_template(entry.data, functions).execute(data)
    except ManifestError as exc:  # TemplateError and anything else from our tree
        return Problem(path, f"template: {exc.message}")
    return None


def dry_run(manifest: Manifest, secrets: Mapping[str, Secret] | None = None) -> list[Problem]:
    """Render every Marble's Files and Env against dummy values; return every problem found.

    *secrets* holds real values to use instead of dummies (for the secret-upload dry run).
    """
    data = _dummy_data(manifest, secrets)
    problems: list[Problem] = []
    for marble_name, marble in manifest.marbles.items():
        base = f"Marbles.{marble_name}.Parameters"
        for name, entry in marble.parameters.files.items():
            if entry.no_templates:
                continue
            problem = _render(entry, FunctionSet.FILES, data, f"{base}.Files.{name}")
            if problem is not None:
                problems.append(problem)
        for name, entry in marble.parameters.env.items():
            path = f"{base}.Env.{name}"
            if b"\x00" in entry.data:
                problems.append(
                    Problem(path, "contains a NUL byte, which an environment variable cannot hold: remove it")
                )
                continue
            if entry.no_templates:
                continue
            problem = _render(entry, FunctionSet.ENV, data, path)
            if problem is not None:
                problems.append(problem)
    return problems
