"""The SDK's governance and recovery calls (secrets, updates, the signed update log, recovery
uploads): the request each one sends (v2, then v1 on 405), and what it makes of the answer,
including malformed answers, driven in memory through an httpx MockTransport."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from harness import StubPki
from marblekeep.client import (
    CoordinatorClient,
    EndpointMissing,
    PendingUpdateInfo,
    RecoverAnswer,
    UpdateAnswer,
)
from marblekeep.errors import ConfigError, CoordinatorError

_PKI = StubPki.create()
_V2_MISSING = httpx.Response(405, content=b'{"status":"error","data":null}\n')


def _success(data: Any) -> httpx.Response:
    return httpx.Response(200, json={"status": "success", "data": data})


@dataclass
class _Seen:
    method: str
    path: str
    query: list[tuple[str, str]]
    body: bytes


@dataclass
class _Recorder:
    answer: Callable[[httpx.Request], httpx.Response]
    seen: list[_Seen] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(
            _Seen(request.method, request.url.path, list(request.url.params.multi_items()), request.read())
        )
        return self.answer(request)


@contextmanager
def _client(
    answer: Callable[[httpx.Request], httpx.Response],
) -> Iterator[tuple[CoordinatorClient, _Recorder]]:
    recorder = _Recorder(answer)
    with CoordinatorClient("h:1", _PKI.root.cert, transport=httpx.MockTransport(recorder)) as client:
        yield client, recorder


def _v1_only(data: Any) -> Callable[[httpx.Request], httpx.Response]:
    def answer(request: httpx.Request) -> httpx.Response:
        return _V2_MISSING if request.url.path.startswith("/api/v2/") else _success(data)

    return answer


# ------------------------------------------------------------------------------------------ secrets


def test_read_secrets_v2_sends_every_name_and_returns_the_secret_objects() -> None:
    objects = {"a": {"Type": "plain", "Private": "aGk="}, "b": {"Type": "symmetric-key", "Size": 128}}
    with _client(lambda _r: _success({"secrets": objects})) as (client, rec):
        assert client.read_secrets(["a", "b"]) == objects
    assert [(s.method, s.path, s.query) for s in rec.seen] == [
        ("GET", "/api/v2/secrets", [("s", "a"), ("s", "b")])
    ]


def test_read_secrets_v1_fallback_returns_the_data_itself() -> None:
    objects = {"a": {"Type": "plain", "Private": "aGk="}}
    with _client(_v1_only(objects)) as (client, rec):
        assert client.read_secrets(["a"]) == objects
    assert [(s.path, s.query) for s in rec.seen] == [
        ("/api/v2/secrets", [("s", "a")]),
        ("/secrets", [("s", "a")]),
    ]


@pytest.mark.parametrize("data", [None, [], {"secrets": "no"}, {"secrets": None}])
def test_read_secrets_refuses_an_answer_that_is_not_an_object(data: Any) -> None:
    with (
        _client(lambda _r: _success(data)) as (client, _rec),
        pytest.raises(CoordinatorError, match="secret get"),
    ):
        client.read_secrets(["a"])


def test_write_secrets_wraps_the_upload_for_v2_and_sends_it_bare_to_v1() -> None:
    upload = {"api_key": {"Key": "c2VjcmV0"}}
    with _client(lambda _r: _success(None)) as (client, rec):
        client.write_secrets(upload)
    assert [(s.method, s.path, json.loads(s.body)) for s in rec.seen] == [
        ("POST", "/api/v2/secrets", {"secrets": upload})
    ]
    with _client(_v1_only(None)) as (client, rec):
        client.write_secrets(upload)
    assert [(s.path, json.loads(s.body)) for s in rec.seen] == [
        ("/api/v2/secrets", {"secrets": upload}),
        ("/secrets", upload),
    ]


# ------------------------------------------------------------------------------------------ updates


RAW = b'{"Packages": {"p": {"SecurityVersion": 3}}}'


def test_apply_update_sends_base64_to_v2_and_reads_the_acknowledgement_state() -> None:
    data = {
        "missingAcknowledgments": 1,
        "missingUsers": ["bob", 7],
        "recoverySecrets": {"owner": "AAAA", "broken": 5},
    }
    with _client(lambda _r: _success(data)) as (client, rec):
        answer = client.apply_update(RAW)
    assert json.loads(rec.seen[0].body) == {"manifest": base64.b64encode(RAW).decode()}
    assert (rec.seen[0].method, rec.seen[0].path) == ("POST", "/api/v2/update")
    assert answer == UpdateAnswer(
        message=None,
        missing_acknowledgments=1,
        missing_users=("bob", "7"),
        recovery_secrets={"owner": "AAAA"},
    )


def test_apply_update_v1_sends_the_raw_manifest_and_means_applied() -> None:
    with _client(_v1_only({"missingAcknowledgments": 2})) as (client, rec):
        answer = client.apply_update(RAW)
    assert [(s.path, s.body) for s in rec.seen][1] == ("/update", RAW)
    assert answer == UpdateAnswer()  # v1 carries no acknowledgement state


def test_acknowledge_update_v2_message_and_recovery_secrets() -> None:
    data = {"message": "All users have acknowledged", "recoverySecrets": {"owner": "QUJD"}}
    with _client(lambda _r: _success(data)) as (client, rec):
        answer = client.acknowledge_update(RAW)
    assert rec.seen[0].path == "/api/v2/update-manifest"
    assert json.loads(rec.seen[0].body) == {"manifest": base64.b64encode(RAW).decode()}
    assert answer.message == "All users have acknowledged"
    assert answer.recovery_secrets == {"owner": "QUJD"}
    assert answer.missing_acknowledgments == 0


def test_acknowledge_update_v1_text_and_malformed_v2() -> None:
    with _client(_v1_only("Acknowledgement recorded")) as (client, rec):
        assert client.acknowledge_update(RAW) == UpdateAnswer(message="Acknowledgement recorded")
    assert (rec.seen[1].path, rec.seen[1].body) == ("/update-manifest", RAW)
    with _client(lambda _r: _success("not an object")) as (client, _rec):
        with pytest.raises(CoordinatorError, match="acknowledge: the answer's data is not a JSON object"):
            client.acknowledge_update(RAW)


def test_cancel_update_returns_the_message_of_either_version() -> None:
    with _client(lambda _r: _success({"message": "Update cancelled"})) as (client, rec):
        assert client.cancel_update().message == "Update cancelled"
    assert (rec.seen[0].method, rec.seen[0].path) == ("POST", "/api/v2/update-cancel")
    with _client(_v1_only("cancelled (v1)")) as (client, rec):
        assert client.cancel_update().message == "cancelled (v1)"
    assert rec.seen[1].path == "/update-cancel"
    with _client(lambda _r: _success({})) as (client, _rec):
        assert client.cancel_update().message is None


def test_pending_update_decodes_the_manifest_only_when_asked() -> None:
    data = {"manifest": base64.b64encode(RAW).decode(), "message": "1 missing", "missingUsers": ["carol"]}
    with _client(lambda _r: _success(data)) as (client, rec):
        pending = client.pending_update()
    assert rec.seen[0].path == "/api/v2/update-manifest"
    assert pending == PendingUpdateInfo("1 missing", ("carol",), base64.b64encode(RAW).decode())
    assert pending.manifest == RAW

    broken = {"manifest": "%%%", "message": "1 missing", "missingUsers": ["carol"]}
    with _client(lambda _r: _success(broken)) as (client, _rec):
        pending = client.pending_update()
    assert pending.missing_users == ("carol",) and pending.message == "1 missing"  # usable without it
    with pytest.raises(
        CoordinatorError, match="pending update: the manifest in the answer is not valid base64"
    ):
        _ = pending.manifest


def test_pending_update_without_one_is_none() -> None:
    answer = httpx.Response(404, json={"status": "fail", "data": None, "message": "no pending update"})
    with _client(lambda _r: answer) as (client, _rec):
        assert client.pending_update() is None
    # a Coordinator that does not serve the endpoint at all is still an error, not "nothing pending"
    with _client(lambda _r: _V2_MISSING) as (client, _rec), pytest.raises(EndpointMissing):
        client.pending_update()
    failing = httpx.Response(500, json={"status": "error", "data": None, "message": "boom"})
    with _client(lambda _r: failing) as (client, _rec), pytest.raises(CoordinatorError):
        client.pending_update()


@pytest.mark.parametrize("form", ["pem-bytes", "pem-text", "certificate"])
def test_the_root_may_be_pem_bytes_text_or_a_certificate(form: str) -> None:
    pem = _PKI.root.cert.public_bytes(serialization.Encoding.PEM)
    root: Any = {"pem-bytes": pem, "pem-text": pem.decode(), "certificate": _PKI.root.cert}[form]
    status = {"code": 2, "message": "ready"}
    with CoordinatorClient("h:1", root, transport=httpx.MockTransport(lambda _r: _success(status))) as client:
        assert client.root == _PKI.root.cert
        assert client.status().code == 2


@pytest.mark.parametrize("root", [b"not a certificate", "", 42])
def test_a_root_that_is_not_a_certificate_is_a_clear_error(root: Any) -> None:
    with pytest.raises(ConfigError, match="root: "):
        CoordinatorClient("h:1", root)


def test_update_log_with_head_keeps_lines_unsanitised_and_the_head_as_sent() -> None:
    line = '{"time":"2025-01-01T00:00:00.000Z","msg":"esc \\u001b"}'
    head = {"entries": 1, "lastEntrySha256": "00", "signature": "c2ln"}
    with _client(lambda _r: _success({"updateLog": [line], "updateLogHead": head})) as (client, rec):
        log = client.update_log_with_head()
    assert log.lines == (line,) and log.head == head
    assert [s.path for s in rec.seen] == ["/api/v2/update"]


def test_update_log_with_head_is_v2_only_and_checks_the_lines() -> None:
    with _client(_v1_only("line\n")) as (client, rec), pytest.raises(EndpointMissing):
        client.update_log_with_head()
    assert [s.path for s in rec.seen] == ["/api/v2/update"]
    with _client(lambda _r: _success({"updateLog": [1, 2]})) as (client, _rec):
        with pytest.raises(CoordinatorError, match="updateLog in the answer is not a list of strings"):
            client.update_log_with_head()
    with _client(lambda _r: _success({"updateLog": None})) as (client, _rec):
        empty = client.update_log_with_head()
    assert empty.lines == () and empty.head is None


# ----------------------------------------------------------------------------------------- recovery


def test_recover_posts_base64_fields_and_reads_the_answer() -> None:
    secret, signature = bytes(range(32)), b"\x01" * 512
    answer = {"remaining": 1, "message": "Secret was processed successfully. Remaining secrets: 1"}
    with _client(lambda _r: _success(answer)) as (client, rec):
        assert client.recover(secret, signature) == RecoverAnswer(1, answer["message"])
    assert (rec.seen[0].method, rec.seen[0].path) == ("POST", "/api/v2/recover")
    assert json.loads(rec.seen[0].body) == {
        "recoverySecret": base64.b64encode(secret).decode(),
        "recoverySecretSignature": base64.b64encode(signature).decode(),
    }


@pytest.mark.parametrize(
    "data",
    [None, "text", {"remaining": True, "message": "m"}, {"remaining": 1}, {"remaining": "1", "message": "m"}],
)
def test_recover_refuses_malformed_answers(data: Any) -> None:
    with (
        _client(lambda _r: _success(data)) as (client, _rec),
        pytest.raises(CoordinatorError, match="recover: "),
    ):
        client.recover(b"s" * 32, b"sig")


def test_recover_is_v2_only() -> None:
    with (
        _client(_v1_only({"remaining": 0, "message": "ok"})) as (client, rec),
        pytest.raises(EndpointMissing),
    ):
        client.recover(b"s" * 32, b"sig")
    assert [s.path for s in rec.seen] == ["/api/v2/recover"]


def test_recovery_public_key_returns_the_validated_der() -> None:
    der = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    text = base64.b64encode(der).decode()
    wrapped = "\n".join(text[i : i + 20] for i in range(0, len(text), 20))  # PEM-like line breaks
    with _client(lambda _r: _success({"ephemeralPublicKey": wrapped})) as (client, rec):
        assert client.recovery_public_key() == der
    assert (rec.seen[0].method, rec.seen[0].path) == ("GET", "/api/v2/recover/public-key")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({}, "lacks ephemeralPublicKey"),
        ({"ephemeralPublicKey": 5}, "lacks ephemeralPublicKey"),
        ({"ephemeralPublicKey": ""}, "is not base64"),
        ({"ephemeralPublicKey": "no*base64"}, "is not base64"),
        ({"ephemeralPublicKey": base64.b64encode(b"not a key").decode()}, "is not a DER public key"),
    ],
)
def test_recovery_public_key_refuses_malformed_answers(data: Any, expected: str) -> None:
    with (
        _client(lambda _r: _success(data)) as (client, _rec),
        pytest.raises(CoordinatorError, match=expected),
    ):
        client.recovery_public_key()
