"""Robustness: the manifest front door with realistic manifests mutated at random (tests/fuzzing.py).

test_manifest_properties.py throws arbitrary JSON at the parser; here every example starts from a
manifest that uses every section (secrets of each type, users, roles, TLS, templates, recovery keys)
and changes one to three values, so the later stages — rules, secret checks, the bounded dry run —
see inputs close to valid ones. Only ``ManifestError`` may come out, never a hang.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from manifest_support import rsa_public_pem, user_cert_pem

from fuzzing import FUZZ, SLOW, no_hang, slow
from marblekeep.core.usersecrets import parse_user_secrets
from marblekeep.errors import ManifestError, MarbleKeepError
from marblekeep.manifest import load_manifest, validate_manifest

RICH: dict[str, Any] = {
    "Packages": {"pkg": {"SignerID": "ab" * 32, "ProductID": 1, "SecurityVersion": 2, "Debug": False}},
    "Marbles": {
        "web": {
            "Package": "pkg",
            "MaxActivations": 3,
            "TLS": ["mesh"],
            "Parameters": {
                "Files": {
                    "/cert.pem": "{{ pem .Secrets.cert.Cert }}{{ pem .Secrets.cert.Private }}",
                    "/raw": {"Encoding": "base64", "Data": "AAEC", "NoTemplates": True},
                    "/key": "{{ raw .Secrets.sym }}",
                },
                "Env": {"TOKEN": "{{ string .Secrets.token }}", "SEAL": "{{ hex .MarbleRun.SealKey }}"},
                "Argv": ["web", "--port", "8080"],
            },
        }
    },
    "Secrets": {
        "cert": {
            "Type": "cert-ecdsa",
            "Size": 256,
            "Shared": True,
            "Cert": {"Subject": {"CommonName": "web"}},
        },
        "rsa": {"Type": "cert-rsa", "Size": 2048, "ValidFor": 30},
        "sym": {"Type": "symmetric-key", "Size": 128},
        "token": {"Type": "plain", "UserDefined": True},
        "ed": {"Type": "cert-ed25519", "UserDefined": True},
    },
    "Users": {"admin": {"Certificate": user_cert_pem("admin"), "Roles": ["w", "u"]}},
    "Roles": {
        "w": {
            "ResourceType": "Secrets",
            "ResourceNames": ["token"],
            "Actions": ["WriteSecret", "ReadSecret"],
        },
        "u": {"ResourceType": "Manifest", "Actions": ["UpdateManifest"]},
    },
    "TLS": {"mesh": {"Incoming": [{"Port": "8080"}], "Outgoing": [{"Addr": "db", "Port": "5432"}]}},
    "RecoveryKeys": {"op": rsa_public_pem(2048)},
    "Config": {"SealMode": "ProductKey", "UpdateThreshold": 1, "FeatureGates": ["SignQuoteEndpoint"]},
}

LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.text(max_size=30)
    | st.sampled_from(
        [
            "{{",
            "{{ pem .Secrets.missing.Cert }}",
            "{{ raw .Secrets.cert }}",
            "Disabled",
            "cert-rsa",
            "AzureHSMSealing",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "*.example.com",
            "",
            "0",
        ]
    )
    | st.lists(st.text(max_size=5), max_size=3)
    | st.fixed_dictionaries({})
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


PATHS = _paths(RICH)[1:]


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        doc = doc[key]
    doc[path[-1]] = value


def _front_door(raw: bytes) -> None:
    with no_hang("validate_manifest"):
        result = validate_manifest(raw)
        try:
            load_manifest(raw)
        except ManifestError as exc:
            assert exc.problems and not result.valid
        else:
            assert result.valid


def test_the_rich_manifest_is_valid() -> None:
    assert validate_manifest(json.dumps(RICH).encode()).valid


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(PATHS), LEAVES), min_size=1, max_size=3))
def test_fuzz_realistic_manifest_mutations(changes: list[tuple[tuple[Any, ...], Any]]) -> None:
    doc = copy.deepcopy(RICH)
    for path, value in changes:
        try:
            _set(doc, path, value)
        except (KeyError, IndexError, TypeError):
            continue  # a parent was replaced by an earlier change
    _front_door(json.dumps(doc).encode())


MANIFEST = load_manifest(json.dumps(RICH).encode())
bodies = st.recursive(
    LEAVES,
    lambda inner: st.dictionaries(
        st.sampled_from(["token", "ed", "sym", "Cert", "Private", "Key", "x"]), inner, max_size=4
    ),
    max_leaves=12,
)


@FUZZ
@given(bodies)
def test_fuzz_user_secret_uploads(body: Any) -> None:
    with no_hang("parse_user_secrets"):
        try:
            parse_user_secrets(body, MANIFEST.secrets)
        except MarbleKeepError as exc:
            assert exc.message


@slow
@SLOW
@given(st.lists(st.tuples(st.sampled_from(PATHS), LEAVES), min_size=1, max_size=10), st.integers(1, 2000))
def test_fuzz_slow_many_mutations_and_large_templates(
    changes: list[tuple[tuple[Any, ...], Any]], n: int
) -> None:
    doc = copy.deepcopy(RICH)
    doc["Marbles"]["web"]["Parameters"]["Files"]["/big"] = "{{ pem .Secrets.cert.Cert }}" * n
    for path, value in changes:
        try:
            _set(doc, path, value)
        except (KeyError, IndexError, TypeError):
            continue
    _front_door(json.dumps(doc).encode())
