"""The activation protocol: binding digest, request parsing, HPKE sealing, challenge book."""

from __future__ import annotations

import base64
import dataclasses
import json
import secrets
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from marblekeep.errors import ConfigError, RequestError, SealError
from marblekeep.marble import protocol
from marblekeep.marble.protocol import (
    MAX_ACTIVATION_BODY,
    ActivationRequest,
    ChallengeBook,
    ChallengeVerdict,
    EvidenceType,
    MarbleParameters,
    binding_digest,
    binding_preimage,
    client_source,
    encode_activation_request,
    encode_challenge_response,
    expected_report_data,
    hpke_info,
    open_parameters,
    parse_activation_request,
    parse_challenge_response,
    seal_parameters,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def make_request(**changes: object) -> tuple[ActivationRequest, X25519PrivateKey]:
    key = X25519PrivateKey.generate()
    req = ActivationRequest(
        marble_type="backend",
        uuid=UUID("0f7b6a3e-3c4d-4e5f-8a9b-0c1d2e3f4a5b"),
        dns_names=("localhost", "backend.default.svc"),
        hpke_public_key=key.public_key().public_bytes_raw(),
        nonce=secrets.token_bytes(32),
        evidence_type=EvidenceType.SIMULATION,
        evidence=b"",
    )
    req = dataclasses.replace(req, evidence=expected_report_data(req))
    return dataclasses.replace(req, **changes), key  # type: ignore[arg-type]


def body_of(req: ActivationRequest) -> dict[str, object]:
    doc = json.loads(encode_activation_request(req))
    assert isinstance(doc, dict)
    return doc


# --------------------------------------------------------------------------- binding


def test_report_data_is_digest_then_zeros() -> None:
    req, _ = make_request()
    rd = expected_report_data(req)
    assert len(rd) == 64
    assert rd[:32] == binding_digest(req.nonce, req.hpke_public_key, req.marble_type, req.uuid, req.dns_names)
    assert rd[32:] == bytes(32)


field_strategies = (
    st.binary(min_size=0, max_size=40),
    st.binary(min_size=0, max_size=40),
    st.text(max_size=12),
    st.uuids(),
    st.lists(st.text(max_size=8), max_size=4),
)
fields = st.tuples(*field_strategies)


@settings(max_examples=300, deadline=None)
@given(a=fields, b=fields)
def test_binding_is_injective(a: tuple, b: tuple) -> None:  # type: ignore[type-arg]
    """Different field values never share a preimage (so never a digest, barring SHA-256 collisions)."""
    pa, pb = binding_preimage(*a), binding_preimage(*b)
    if a == b:
        assert pa == pb
        assert binding_digest(*a) == binding_digest(*b)
    else:
        assert pa != pb
        assert binding_digest(*a) != binding_digest(*b)


@settings(max_examples=200, deadline=None)
@given(base=fields, which=st.integers(min_value=0, max_value=4), data=st.data())
def test_changing_any_one_field_changes_the_digest(base: tuple, which: int, data: st.DataObject) -> None:  # type: ignore[type-arg]
    new_value = data.draw(field_strategies[which].filter(lambda v: v != base[which]))
    changed = list(base)
    changed[which] = new_value
    assert binding_digest(*base) != binding_digest(*changed)


def test_dns_name_boundaries_are_bound() -> None:
    """["ab"] vs ["a", "b"] and a name moved into the type: length prefixes keep them apart."""
    n, pk, u = bytes(32), bytes(32), uuid4()
    assert binding_digest(n, pk, "t", u, ["ab"]) != binding_digest(n, pk, "t", u, ["a", "b"])
    assert binding_digest(n, pk, "ta", u, []) != binding_digest(n, pk, "t", u, ["a"])
    assert binding_digest(n, pk, "t", u, ["a", "b"]) != binding_digest(n, pk, "t", u, ["b", "a"])


def test_hpke_info_layout() -> None:
    u = uuid4()
    info = hpke_info(bytes(range(32)), u)
    assert info == b"marblekeep-seal1" + bytes(range(32)) + u.bytes
    assert len(info) == 64


# --------------------------------------------------------------------------- wire format


def test_encode_parse_round_trip() -> None:
    req, _ = make_request()
    assert parse_activation_request(encode_activation_request(req)) == req


@settings(max_examples=150, deadline=None)
@given(
    marble_type=st.text(min_size=1, max_size=30).filter(
        lambda s: not any(ord(c) < 32 or c == "\x7f" for c in s)
    ),
    names=st.lists(st.from_regex(r"\A[a-z0-9.\-:]{1,30}\Z"), max_size=5),
    evidence_type=st.sampled_from(list(EvidenceType)),
    evidence=st.binary(max_size=200),
    u=st.uuids(),
)
def test_encode_parse_round_trip_property(
    marble_type: str, names: list[str], evidence_type: EvidenceType, evidence: bytes, u: UUID
) -> None:
    req, _ = make_request(
        marble_type=marble_type, dns_names=tuple(names), evidence_type=evidence_type, evidence=evidence,
        uuid=u,
    )
    try:
        marble_type.encode("utf-8")
    except UnicodeEncodeError:
        with pytest.raises((RequestError, UnicodeEncodeError)):
            parse_activation_request(encode_activation_request(req))
        return
    assert parse_activation_request(encode_activation_request(req)) == req


json_alphabet = st.sampled_from([*'{}[]:,"\\ 0123456789.eE+-truefalsnu', '"marbleType"', '"evidence"'])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400) | st.lists(json_alphabet, max_size=80).map(lambda xs: "".join(xs).encode()))
def test_parse_arbitrary_bytes_gives_request_or_request_error(body: bytes) -> None:
    try:
        req = parse_activation_request(body)
    except RequestError as exc:
        assert exc.message
    else:
        assert isinstance(req, ActivationRequest)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=15,
)


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(["marbleType", "uuid", "dnsNames", "hpkePublicKey", "nonce", "evidence",
                              "evidence.type", "evidence.data"]),
       value=json_values)
def test_parse_mutated_field_gives_request_or_request_error(field: str, value: object) -> None:
    req, _ = make_request()
    doc = body_of(req)
    if field.startswith("evidence."):
        doc["evidence"][field.split(".")[1]] = value  # type: ignore[index]
    else:
        doc[field] = value
    try:
        parsed = parse_activation_request(json.dumps(doc).encode())
    except RequestError as exc:
        assert field in exc.message or "evidence" in exc.message
    else:
        assert isinstance(parsed, ActivationRequest)


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d.pop("nonce"), "'nonce' is missing"),
        (lambda d: d.update(nonce=base64.b64encode(bytes(31)).decode()), "'nonce' must decode to exactly 32"),
        (lambda d: d.update(nonce="!!!!"), "'nonce' is not standard base64"),
        (lambda d: d.update(hpkePublicKey=base64.b64encode(bytes(33)).decode()), "'hpkePublicKey'"),
        (lambda d: d.update(uuid="{0f7b6a3e-3c4d-4e5f-8a9b-0c1d2e3f4a5b}"), "'uuid'"),
        (lambda d: d.update(uuid="0f7b6a3e3c4d4e5f8a9b0c1d2e3f4a5b"), "'uuid'"),
        (lambda d: d.update(marbleType=""), "'marbleType' must not be empty"),
        (lambda d: d.update(marbleType="a\nb"), "'marbleType' contains control"),
        (lambda d: d.update(marbleType="x" * 300), "'marbleType' is 300 bytes"),
        (lambda d: d.update(dnsNames="localhost"), "'dnsNames' must be a JSON array"),
        (lambda d: d.update(dnsNames=["ok", "has space"]), "'dnsNames[1]'"),
        (lambda d: d.update(dnsNames=["x"] * 65), "'dnsNames' has 65 entries"),
        (lambda d: d.update(dnsNames=["a" * 254]), "'dnsNames[0]' is 254 bytes"),
        (lambda d: d.update(evidence={"type": "sev-snp", "data": ""}), "'evidence.type' must be one of"),
        (lambda d: d.update(evidence={"type": "tdx"}), "'evidence' must have both"),
        (lambda d: d.update(evidence=[]), "'evidence' must be an object"),
    ],
)
def test_parse_names_the_bad_field(mutate, needle: str) -> None:  # type: ignore[no-untyped-def]
    req, _ = make_request()
    doc = body_of(req)
    mutate(doc)
    with pytest.raises(RequestError) as info:
        parse_activation_request(json.dumps(doc).encode())
    assert needle in info.value.message
    assert info.value.http_status == 400


def test_parse_bounds_body_and_evidence() -> None:
    req, _ = make_request()
    with pytest.raises(RequestError, match="limit is 262144 bytes"):
        parse_activation_request(b" " * (MAX_ACTIVATION_BODY + 1))
    doc = body_of(req)
    doc["evidence"] = {"type": "sgx-dcap", "data": base64.b64encode(bytes(128 * 1024 + 3)).decode()}
    with pytest.raises(RequestError, match=r"'evidence\.data' is too long"):
        parse_activation_request(json.dumps(doc).encode())
    doc["evidence"] = {"type": "sgx-dcap", "data": base64.b64encode(bytes(128 * 1024)).decode()}
    assert len(parse_activation_request(json.dumps(doc).encode()).evidence) == 128 * 1024


def test_parse_rejects_duplicate_keys_deep_nesting_and_bad_utf8() -> None:
    req, _ = make_request()
    body = encode_activation_request(req)
    dup = body[:-1] + b',"nonce":"' + base64.b64encode(bytes(32)) + b'"}'
    with pytest.raises(RequestError, match="duplicate JSON key 'nonce'"):
        parse_activation_request(dup)
    with pytest.raises(RequestError, match=r"nested too deeply|not valid JSON"):
        parse_activation_request(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(RequestError, match="not valid UTF-8"):
        parse_activation_request(b'{"marbleType":"\xff"}')
    with pytest.raises(RequestError, match="must be a JSON object"):
        parse_activation_request(b"[]")
    with pytest.raises(RequestError, match="NaN is not allowed"):
        parse_activation_request(b'{"x": NaN}')
    with pytest.raises(RequestError, match="a number is too long"):
        parse_activation_request(b'{"marbleType":' + b"9" * 5000 + b"}")


def test_parse_ignores_unknown_fields() -> None:
    req, _ = make_request()
    doc = body_of(req)
    doc["future"] = {"anything": 1}
    assert parse_activation_request(json.dumps(doc).encode()) == req


def test_challenge_response_round_trip_and_errors() -> None:
    nonce = secrets.token_bytes(32)
    assert parse_challenge_response(encode_challenge_response(nonce)) == nonce
    with pytest.raises(RequestError):
        parse_challenge_response(b'{"status":"fail","message":"no"}')
    with pytest.raises(RequestError, match="exactly 32"):
        parse_challenge_response(b'{"status":"success","data":{"nonce":"AAAA"}}')


# --------------------------------------------------------------------------- sealing

params_strategy = st.builds(
    MarbleParameters,
    files=st.dictionaries(st.text(min_size=1, max_size=20).filter(lambda s: "\x00" not in s),
                          st.binary(max_size=100), max_size=4),
    env=st.dictionaries(
        st.text(min_size=1, max_size=12).filter(lambda s: "=" not in s and "\x00" not in s),
        st.binary(max_size=60).filter(lambda b: b"\x00" not in b),
        max_size=4,
    ),
    argv=st.lists(st.text(max_size=12).filter(lambda s: "\x00" not in s), max_size=4).map(tuple),
)


@settings(max_examples=100, deadline=None)
@given(params=params_strategy)
def test_seal_open_round_trip(params: MarbleParameters) -> None:
    req, key = make_request()
    try:
        sealed = seal_parameters(params, req)
    except UnicodeEncodeError:  # lone surrogates in generated text cannot be JSON-encoded as UTF-8
        return
    assert open_parameters(sealed, key, req) == params


def test_sealed_blob_layout_and_randomisation() -> None:
    req, key = make_request()
    params = MarbleParameters(files={"a": b"secret-file"}, env={"K": b"secret-env"}, argv=("x",))
    one, two = seal_parameters(params, req), seal_parameters(params, req)
    plaintext_len = len(json.dumps({"Files": {"a": base64.b64encode(b"secret-file").decode()},
                                    "Env": {"K": base64.b64encode(b"secret-env").decode()},
                                    "Argv": ["x"]}, separators=(",", ":")))
    assert len(one) == 32 + plaintext_len + 16
    assert one != two  # fresh encapsulation each time
    assert b"secret" not in one
    assert open_parameters(one, key, req) == open_parameters(two, key, req) == params


def test_open_fails_with_wrong_key_nonce_uuid_or_tampering() -> None:
    req, key = make_request()
    sealed = seal_parameters(MarbleParameters(env={"A": b"1"}), req)
    for bad_key, bad_req, bad_blob in [
        (X25519PrivateKey.generate(), req, sealed),
        (key, dataclasses.replace(req, nonce=secrets.token_bytes(32)), sealed),
        (key, dataclasses.replace(req, uuid=uuid4()), sealed),
        (key, req, sealed[:-1] + bytes([sealed[-1] ^ 1])),
        (key, req, sealed[:5]),
        (key, req, b""),
    ]:
        with pytest.raises(SealError, match="cannot be opened"):
            open_parameters(bad_blob, bad_key, bad_req)


def _seal_raw(plaintext: bytes, req: ActivationRequest) -> bytes:
    pk = X25519PublicKey.from_public_bytes(req.hpke_public_key)
    return protocol._SUITE.encrypt(plaintext, pk, hpke_info(req.nonce, req.uuid))


@pytest.mark.parametrize(
    ("plaintext", "needle"),
    [
        (b"not json", "not valid JSON"),
        (b"[]", "must be a JSON object"),
        (b'{"Env":{"A":"AGI="}}', "NUL byte"),
        (b'{"Env":{"A=B":"YQ=="}}', "containing '='"),
        (b'{"Env":{"":"YQ=="}}', "empty name"),
        (b'{"Files":{"":"YQ=="}}', "empty path"),
        (b'{"Files":{"a":"%%"}}', "not standard base64"),
        (b'{"Files":[]}', "'Files' must be an object"),
        (b'{"Argv":"ls"}', "'Argv' must be an array"),
        (b'{"Argv":[1]}', "'Argv' must be an array"),
    ],
)
def test_open_rejects_malformed_parameters(plaintext: bytes, needle: str) -> None:
    req, key = make_request()
    with pytest.raises(SealError, match=needle):
        open_parameters(_seal_raw(plaintext, req), key, req)


def test_open_accepts_missing_and_null_members() -> None:
    req, key = make_request()
    assert open_parameters(_seal_raw(b'{"Files":null,"Argv":null}', req), key, req) == MarbleParameters()


def test_seal_error_messages_never_contain_secret_values() -> None:
    req, key = make_request()
    secret = b"TOP-SECRET-VALUE-1234"
    plaintext = json.dumps({"Env": {"A": base64.b64encode(secret + b"\x00").decode()}}).encode()
    with pytest.raises(SealError) as info:
        open_parameters(_seal_raw(plaintext, req), key, req)
    assert "TOP-SECRET" not in info.value.diagnostics()
    assert base64.b64encode(secret).decode()[:12] not in info.value.diagnostics()


def test_seal_to_low_order_public_key_is_a_request_error() -> None:
    req, _ = make_request(hpke_public_key=bytes(32))
    with pytest.raises(RequestError, match="hpkePublicKey"):
        seal_parameters(MarbleParameters(), req)


# --------------------------------------------------------------------------- challenges


KEY = bytes(range(32))


def test_challenge_is_single_use() -> None:
    book = ChallengeBook(KEY)
    nonce = book.issue(NOW, secrets.token_bytes)
    assert len(nonce) == 32
    assert len(book) == 0  # issuing stores nothing
    assert book.consume(nonce, NOW + timedelta(seconds=1)) is ChallengeVerdict.ACCEPTED
    assert book.consume(nonce, NOW + timedelta(seconds=1)) is ChallengeVerdict.USED
    assert book.consume(secrets.token_bytes(32), NOW) is ChallengeVerdict.UNKNOWN
    assert len(book) == 1


def test_challenge_expires() -> None:
    book = ChallengeBook(KEY, ttl=timedelta(seconds=10))
    a = book.issue(NOW, secrets.token_bytes)
    b = book.issue(NOW, secrets.token_bytes)
    assert book.consume(a, NOW + timedelta(seconds=9.9)) is ChallengeVerdict.ACCEPTED
    assert book.consume(b, NOW + timedelta(seconds=10)) is ChallengeVerdict.EXPIRED
    # a used nonce is forgotten only once it has expired: then it is refused as expired
    assert book.consume(a, NOW + timedelta(seconds=12)) is ChallengeVerdict.EXPIRED
    assert len(book) == 0


def test_a_flood_of_challenges_evicts_nothing() -> None:
    book = ChallengeBook(KEY, max_used=3)
    pending = book.issue(NOW, secrets.token_bytes)
    for _ in range(20_000):
        book.issue(NOW, secrets.token_bytes)
    assert book.consume(pending, NOW + timedelta(seconds=30)) is ChallengeVerdict.ACCEPTED


def test_nonces_are_authenticated_by_the_issuing_book() -> None:
    book, other = ChallengeBook(KEY), ChallengeBook(bytes(32))
    nonce = other.issue(NOW, secrets.token_bytes)
    assert book.consume(nonce, NOW) is ChallengeVerdict.UNKNOWN  # another key (a restart)
    mine = bytearray(book.issue(NOW, secrets.token_bytes))
    for index in (0, 7, 8, 15, 16, 31):  # time, random part, tag
        altered = bytearray(mine)
        altered[index] ^= 1
        assert book.consume(bytes(altered), NOW) in (ChallengeVerdict.UNKNOWN, ChallengeVerdict.EXPIRED)
    assert book.consume(bytes(mine), NOW) is ChallengeVerdict.ACCEPTED


def test_a_clock_stepping_back_does_not_revive_used_nonces() -> None:
    book = ChallengeBook(KEY, ttl=timedelta(seconds=10))
    nonce = book.issue(NOW, secrets.token_bytes)
    assert book.consume(nonce, NOW) is ChallengeVerdict.ACCEPTED
    book.issue(NOW + timedelta(hours=1), secrets.token_bytes)  # purges the used set
    assert len(book) == 0
    assert book.consume(nonce, NOW + timedelta(seconds=1)) is ChallengeVerdict.EXPIRED


def test_used_set_is_bounded_per_source_and_in_all() -> None:
    book = ChallengeBook(KEY, max_used=5, max_used_per_source=2)
    nonces = [book.issue(NOW, secrets.token_bytes) for _ in range(8)]
    assert book.consume(nonces[0], NOW, "10.0.0.1") is ChallengeVerdict.ACCEPTED
    assert book.consume(nonces[1], NOW, "10.0.0.1") is ChallengeVerdict.ACCEPTED
    assert book.consume(nonces[2], NOW, "10.0.0.1") is ChallengeVerdict.SOURCE_BUSY
    assert book.consume(nonces[2], NOW, "10.0.0.2") is ChallengeVerdict.ACCEPTED  # not consumed above
    assert book.consume(nonces[3], NOW, "10.0.0.2") is ChallengeVerdict.ACCEPTED
    assert book.consume(nonces[4], NOW, "10.0.0.3") is ChallengeVerdict.ACCEPTED
    assert book.consume(nonces[5], NOW, "10.0.0.4") is ChallengeVerdict.BUSY
    assert len(book) == 5
    # once they expire, the quota is back
    later = NOW + timedelta(seconds=61)
    fresh = book.issue(later, secrets.token_bytes)
    assert book.consume(fresh, later, "10.0.0.1") is ChallengeVerdict.ACCEPTED
    assert len(book) == 1


@pytest.mark.parametrize(
    ("address", "source"),
    [
        ("10.1.2.3", "10.1.2.3"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        (None, ""),
    ],
)
def test_client_source(address: str | None, source: str) -> None:
    assert client_source(address) == source


def test_challenge_book_rejects_bad_settings() -> None:
    with pytest.raises(ConfigError):
        ChallengeBook(KEY, ttl=timedelta(0))
    with pytest.raises(ConfigError):
        ChallengeBook(KEY, max_used=0)
    with pytest.raises(ConfigError):
        ChallengeBook(b"short")
