"""YAML → JSON conversion as MarbleRun's CLI does it (yaml.YAMLToJSONStrict)."""

from __future__ import annotations

import hashlib
import json

import pytest
from manifest_support import SIGNER

from marblekeep.errors import ManifestError
from marblekeep.manifest import load_manifest, manifest_fingerprint, yaml_to_json

MANIFEST_YAML = f"""\
# a comment
Packages:
  pkg:
    SignerID: "{SIGNER}"
    ProductID: 0x10
    SecurityVersion: 1_0
    Debug: no
Marbles:
  web:
    Package: pkg
    MaxActivations: 3
    Parameters:
      Env:
        GREETING: "<b>Tom & Jerry</b>"
        WHEN: 2030-01-01T00:00:00Z
        DURATION: 1:30
      Argv: [web, --port, "8080"]
Secrets:
  cert:
    Type: cert-ecdsa
    Size: 256
    Shared: yes
    Cert:
      NotAfter: 2030-01-31T00:00:00Z
""".encode()

EXPECTED = (
    b'{"Marbles":{"web":{"MaxActivations":3,"Package":"pkg","Parameters":{"Argv":["web","--port","8080"],'
    b'"Env":{"DURATION":"1:30","GREETING":"\\u003cb\\u003eTom \\u0026 Jerry\\u003c/b\\u003e",'
    b'"WHEN":"2030-01-01T00:00:00Z"}}}},'
    b'"Packages":{"pkg":{"Debug":false,"ProductID":16,"SecurityVersion":10,"SignerID":"'
    + SIGNER.encode()
    + b'"}},"Secrets":{"cert":{"Cert":{"NotAfter":"2030-01-31T00:00:00Z"},"Shared":true,'
    b'"Size":256,"Type":"cert-ecdsa"}}}'
)


def test_yaml_converts_like_go() -> None:
    converted = yaml_to_json(MANIFEST_YAML)
    assert converted == EXPECTED
    manifest = load_manifest(converted)
    assert manifest.raw == converted
    assert manifest.packages["pkg"].product_id == 16
    assert manifest.secrets["cert"].shared
    assert manifest.marbles["web"].parameters.env["GREETING"].data == b"<b>Tom & Jerry</b>"


def test_json_is_returned_unchanged() -> None:
    raw = b'{ "b": 1,\n  "a": [1.50, "<"] }\n'
    assert yaml_to_json(raw) is raw or yaml_to_json(raw) == raw
    assert manifest_fingerprint(yaml_to_json(raw)) == hashlib.sha256(raw).hexdigest()


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        (b"a: 1.0", b'{"a":1}'),
        (b"a: 1e3", b'{"a":1000}'),
        (b"a: 0.000001", b'{"a":0.000001}'),
        (b"a: 1.5e-7", b'{"a":1.5e-7}'),
        (b"a: 1e21", b'{"a":1e+21}'),
        (b"a: 017", b'{"a":15}'),
        (b"a: 0o17", b'{"a":15}'),
        (b"a: 0b101", b'{"a":5}'),
        (b"a: 08", b'{"a":8}'),
        (b"a: [y, n, on, off, Yes, FALSE]", b'{"a":[true,false,true,false,true,false]}'),
        (b"a: ~", b'{"a":null}'),
        (b"1: x\ntrue: z\n1.5: w", b'{"1":"x","1.5":"w","true":"z"}'),
        # yaml.v2 resolves the key y (and n, on, off, yes, no) as a boolean, as Go's CLI does.
        (b"y: 1\nx: 2", b'{"true":1,"x":2}'),
        (b"a: \"\\u2028\\u2029\"", b'{"a":"\\u2028\\u2029"}'),
        (b"a: \"tab\\there\"", b'{"a":"tab\\there"}'),
        (b"a: caf\xc3\xa9", b'{"a":"caf\xc3\xa9"}'),
        (b"base: &b {p: 1, q: 2}\nder:\n  <<: *b\n  q: 3", b'{"base":{"p":1,"q":2},"der":{"p":1,"q":3}}'),
        (b"", b"null"),
        (b"- 1\n- two", b'[1,"two"]'),
    ],
)
def test_yaml_scalars_and_maps(yaml_text: bytes, expected: bytes) -> None:
    assert yaml_to_json(yaml_text) == expected


@pytest.mark.parametrize(
    ("yaml_text", "fragment"),
    [
        (b"a: 1\na: 2\n", 'duplicate key "a"'),
        (b"a: [1,\n", "neither JSON nor valid YAML"),
        (b"a: .nan\n", "NaN"),
        (b"a: 1\n---\nb: 2\n", "several documents"),
        (b"a: \xff\n", "UTF-8"),
        (b"? [1, 2]\n: x\n", "key"),
        (b"a: !!python/object:os.system x\n", "neither JSON nor valid YAML"),
        (b"[" * 5000, "neither JSON nor valid YAML"),
    ],
)
def test_bad_yaml_gives_manifest_error(yaml_text: bytes, fragment: str) -> None:
    with pytest.raises(ManifestError) as info:
        yaml_to_json(yaml_text)
    assert fragment in info.value.message
    assert info.value.problems


def test_alias_bomb_is_refused() -> None:
    lines = [b"a0: &a0 [" + b'"' + b"x" * 80 + b'"]']
    for i in range(1, 30):
        lines.append(f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]".encode())
    with pytest.raises(ManifestError) as info:
        yaml_to_json(b"\n".join(lines))
    assert "exceeds" in info.value.message


def test_converted_output_is_valid_json_with_sorted_keys() -> None:
    converted = yaml_to_json(b"z: 1\nb: {x: 2, a: [3, {d: 4, c: 5}]}\n")
    assert converted == b'{"b":{"a":[3,{"c":5,"d":4}],"x":2},"z":1}'
    assert json.loads(converted) == {"b": {"a": [3, {"c": 5, "d": 4}], "x": 2}, "z": 1}
