"""Property tests: the manifest front door only ever succeeds or raises ManifestError."""

from __future__ import annotations

import json
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from manifest_support import base, dumps

from marblekeep.errors import ManifestError
from marblekeep.manifest import load_manifest, validate_manifest, yaml_to_json

# MANIFEST_FUZZ_EXAMPLES=5000 for a longer hunt; CI keeps the default small.
SETTINGS = settings(
    max_examples=int(os.environ.get("MANIFEST_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

FIELD_NAMES = [
    "Packages", "Marbles", "Secrets", "Users", "Roles", "RecoveryKeys", "TLS", "Config", "Infrastructures",
    "Debug", "UniqueID", "SignerID", "ProductID", "SecurityVersion", "AcceptedTCBStatuses", "TDX", "MRTD",
    "Package", "MaxActivations", "Parameters", "Files", "Env", "Argv", "Data", "Encoding", "NoTemplates",
    "Type", "Size", "Shared", "UserDefined", "ValidFor", "Cert", "Private", "Public", "Subject", "CommonName",
    "DNSNames", "IPAddresses", "URIs", "KeyUsage", "ExtKeyUsage", "NotAfter", "Certificate", "ResourceType",
    "ResourceNames", "Actions", "Incoming", "Outgoing", "Port", "Addr", "DisableClientAuth", "SealMode",
    "FeatureGates", "UpdateThreshold", "RecoveryThreshold", "CPUSVN", "QESVN", "pkg", "m",
]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["symmetric-key", "cert-rsa", "plain", "base64", "hex", "{{ raw .Secrets.x }}",
                       "2030-01-01T00:00:00Z", "10.0.0.1", "Manifest", "Secrets", "YmFy", "zz"])
)
keys = st.sampled_from(FIELD_NAMES) | st.text(max_size=8)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=30,
)


def _must_only_raise_manifest_error(raw: bytes) -> None:
    result = validate_manifest(raw)
    assert (result.manifest is None) == bool(result.problems)
    try:
        manifest = load_manifest(raw)
    except ManifestError as exc:
        assert exc.problems
        assert not result.valid
    else:
        assert result.valid
        assert manifest.raw == raw


@SETTINGS
@given(st.binary(max_size=300))
def test_arbitrary_bytes(raw: bytes) -> None:
    _must_only_raise_manifest_error(raw)


@SETTINGS
@given(json_values)
def test_arbitrary_json_values(value: Any) -> None:
    _must_only_raise_manifest_error(json.dumps(value).encode())


@SETTINGS
@given(st.dictionaries(keys, json_values, max_size=6), st.sampled_from(FIELD_NAMES[:9]))
def test_manifest_shaped_documents(extra: dict[str, Any], section: str) -> None:
    manifest = base()
    manifest["Marbles"]["m"].update(extra)
    manifest["Packages"]["pkg"].update(extra)
    if section == "Config":
        manifest["Config"] = extra
    else:
        manifest[section] = {**manifest.get(section, {}), "x": extra}
    _must_only_raise_manifest_error(dumps(manifest))


yaml_like = st.text(alphabet=" :-[]{}&*!|>'\"#\n,?<abyYn01.~%@", max_size=120).map(str.encode)


@SETTINGS
@given(st.binary(max_size=200) | yaml_like)
def test_yaml_conversion_only_raises_manifest_error(data: bytes) -> None:
    try:
        converted = yaml_to_json(data)
    except ManifestError as exc:
        assert exc.problems
    else:
        _must_only_raise_manifest_error(converted)


@SETTINGS
@given(json_values)
def test_json_passes_through_yaml_conversion_unchanged(value: Any) -> None:
    raw = json.dumps(value, indent=1).encode()
    assert yaml_to_json(raw) == raw


MAP_KEYS = {"pkg", "m", "key", "K"}


def _recase(value: Any, flips: list[bool], counter: list[int]) -> Any:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            counter[0] += 1
            flip = flips[counter[0] % len(flips)] and k not in MAP_KEYS  # map keys are exact
            out[k.swapcase() if flip else k] = _recase(v, flips, counter)
        return out
    return value


@SETTINGS
@given(st.lists(st.booleans(), min_size=1, max_size=16))
def test_field_names_are_case_insensitive(flips: list[bool]) -> None:
    manifest = base()
    manifest["Secrets"] = {"key": {"Type": "symmetric-key", "Size": 128, "Shared": True}}
    entry = {"Data": "{{ hex .Secrets.key }}", "Encoding": "string"}
    manifest["Marbles"]["m"]["Parameters"] = {"Env": {"K": entry}}
    manifest["Config"] = {"SealMode": "UniqueKey", "FeatureGates": ["MonotonicCounter"]}
    reference = load_manifest(dumps(manifest))
    recased = load_manifest(dumps(_recase(manifest, flips, [0])))
    assert recased.packages == reference.packages
    assert recased.marbles == reference.marbles
    assert recased.secrets == reference.secrets
    assert recased.config == reference.config
