"""Rule 14 (one certificate per user) compares certificates as DER, not as PEM text (issue 11, #10).

Two users listed with the same certificate in different PEM spellings authenticate as the same
TLS client; counted as two, they would inflate the acknowledgements a full update needs (with
``UpdateThreshold: 0`` one of them could never acknowledge, so the update could never complete).
"""

from __future__ import annotations

from typing import Any

import pytest
from manifest_support import base, check, dumps, problem_at, user_cert_pem

from marblekeep.errors import ManifestError
from marblekeep.manifest import load_manifest


def _with_users(a: str, b: str) -> dict[str, Any]:
    m = base()
    m["Users"] = {"alice": {"Certificate": a, "Roles": ["upd"]}, "bob": {"Certificate": b, "Roles": ["upd"]}}
    m["Roles"] = {"upd": {"ResourceType": "Manifest", "Actions": ["UpdateManifest"]}}
    return m


SPELLINGS = {
    "crlf": lambda pem: pem.replace("\n", "\r\n"),
    "trailing-text": lambda pem: pem + "# alice's certificate, again\n",
    "leading-text": lambda pem: "subject=CN=a\n" + pem,
    "no-final-newline": lambda pem: pem.rstrip("\n"),
}


@pytest.mark.parametrize("spelling", sorted(SPELLINGS))
def test_same_certificate_in_another_pem_spelling_is_a_duplicate(spelling: str) -> None:
    pem = user_cert_pem("a")
    other = SPELLINGS[spelling](pem)
    assert other != pem
    result = check(_with_users(pem, other))
    assert not result.valid
    assert 'same certificate as user "alice"' in problem_at(result, "Users.bob.Certificate")
    with pytest.raises(ManifestError, match="same certificate"):
        load_manifest(dumps(_with_users(pem, other)))


def test_different_certificates_are_not_duplicates() -> None:
    assert check(_with_users(user_cert_pem("a"), user_cert_pem("b").replace("\n", "\r\n"))).valid
