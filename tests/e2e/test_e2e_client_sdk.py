"""The Client API SDK (marblekeep.client) on its own: JSend decoding, addresses, era configs,
the pinned-root TLS context with a user's client certificate, manifest checks, and that no
secret value reaches an error message."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import click
import httpx
import pytest
import trustme
from aiohttp import web
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given, settings
from hypothesis import strategies as st

import marblekeep.client as client_pkg
from harness import STATUS_3, StubPki, StubServer, jsend
from marblekeep.cli.client_cmds import client_cert_pair, user_cert_options
from marblekeep.client import (
    CoordinatorClient,
    EndpointMissing,
    ManifestInfo,
    TrustSettings,
    base_url,
    clean_text,
    connect,
    decode_envelope,
    default_cert_path,
    load_pinned_root,
    parse_era_config,
    pinned_context,
)
from marblekeep.crypto.signing import sign_manifest
from marblekeep.errors import (
    AttestationError,
    AuthenticationError,
    AuthorizationError,
    ConfigError,
    CoordinatorError,
    MarbleKeepError,
)

# ------------------------------------------------------------------------------------------- JSend


def test_success_returns_data() -> None:
    assert decode_envelope(200, b'{"status":"success","data":{"code":3}}\n', "GET /x") == {"code": 3}


def test_fail_and_error_carry_the_coordinators_message_and_problems() -> None:
    body = json.dumps(
        {
            "status": "fail",
            "data": {"problems": [{"path": "Marbles.m.Package", "message": "undefined package"}]},
            "message": "manifest invalid",
        }
    ).encode()
    with pytest.raises(CoordinatorError) as info:
        decode_envelope(400, body, "POST /api/v2/manifest")
    assert info.value.status == 400
    assert "POST /api/v2/manifest" in info.value.message and "manifest invalid" in info.value.message
    assert [str(p) for p in info.value.problems] == ["Marbles.m.Package: undefined package"]

    with pytest.raises(CoordinatorError, match="server is not in expected state"):
        decode_envelope(
            500, b'{"status":"error","data":null,"message":"server is not in expected state"}', "x"
        )


def test_status_codes_map_to_error_classes() -> None:
    with pytest.raises(AuthenticationError, match="-c/--cert"):
        decode_envelope(401, b'{"status":"fail","data":null,"message":"unauthorized user"}', "x")
    with pytest.raises(AuthorizationError):
        decode_envelope(403, b'{"status":"error","data":null,"message":"disabled"}', "x")
    with pytest.raises(EndpointMissing):
        decode_envelope(405, b'{"status":"error","data":null}\n', "x")
    with pytest.raises(EndpointMissing):
        decode_envelope(404, b"404: Not Found", "x")
    with pytest.raises(CoordinatorError, match="not JSend"):
        decode_envelope(200, b"<html>hello</html>", "x")


@settings(max_examples=200, deadline=None)
@given(
    status=st.integers(100, 599),
    body=st.binary(max_size=300)
    | st.builds(
        lambda d: json.dumps(d).encode(),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=20),
            lambda c: (
                st.lists(c, max_size=3)
                | st.dictionaries(
                    st.sampled_from(["status", "data", "message", "problems", "path"]) | st.text(max_size=5),
                    c,
                    max_size=4,
                )
            ),
            max_leaves=10,
        ),
    ),
)
def test_any_answer_decodes_or_raises_one_of_our_errors(status: int, body: bytes) -> None:
    try:
        decode_envelope(status, body, "GET /api/v2/status")
    except MarbleKeepError as exc:
        assert exc.message.startswith("GET /api/v2/status")


def test_clean_text_escapes_terminal_control_sequences_and_caps_length() -> None:
    assert clean_text("red \x1b[31mALERT\x1b[0m\nnext") == "red \\x1b[31mALERT\\x1b[0m\nnext"
    assert clean_text("a\u202eb") == "a\\u202eb"
    long = clean_text("x" * 5000)
    assert len(long) < 2100 and long.endswith("(3000 more characters)")


# ---------------------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("addr", "url"),
    [
        ("localhost:4433", "https://localhost:4433"),
        ("127.0.0.1:1", "https://127.0.0.1:1"),
        ("coordinator.example", "https://coordinator.example:4433"),
        ("[::1]:4433", "https://[::1]:4433"),
        ("::1", "https://[::1]:4433"),
        ("https://host:99/", "https://host:99"),
        (":4433", "https://localhost:4433"),
        ("[0:0::1]", "https://[::1]:4433"),
        ("10.0.0.1", "https://10.0.0.1:4433"),
    ],
)
def test_base_url(addr: str, url: str) -> None:
    assert base_url(addr) == url


@pytest.mark.parametrize(
    "addr", ["http://host:80", "host:0", "host:99999", "host:port", "a b:1", "host/path:1", ""]
)
def test_bad_addresses_are_config_errors(addr: str) -> None:
    with pytest.raises(ConfigError, match="Coordinator address"):
        base_url(addr)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40) | st.from_regex(r"\[?[0-9a-fA-F:.\]]{0,20}(:[0-9]{1,6})?", fullmatch=True))
def test_any_address_gives_a_url_httpx_accepts_or_a_config_error(addr: str) -> None:
    try:
        url = base_url(addr)
    except ConfigError as exc:
        assert "Coordinator address" in exc.message
        return
    parsed = httpx.URL(url)
    assert parsed.scheme == "https" and parsed.port is not None


def test_default_cert_path() -> None:
    home = Path("/home/u")
    assert default_cert_path({}, home) == Path("/home/u/.config/marblekeep/coordinator-cert.pem")
    assert default_cert_path({"XDG_CONFIG_HOME": "/x"}, home) == Path("/x/marblekeep/coordinator-cert.pem")
    assert (
        default_cert_path({"XDG_CONFIG_HOME": "rel"}, home)
        == home / ".config/marblekeep/coordinator-cert.pem"
    )


def test_a_pin_file_without_a_certificate_is_a_config_error(tmp_path: Path) -> None:
    pin = tmp_path / "pin.pem"
    assert load_pinned_root(pin) is None
    pin.write_text("not a certificate")
    with pytest.raises(ConfigError, match="remove it"):
        load_pinned_root(pin)


# ------------------------------------------------------------------------------------- era configs

MRENCLAVE = "ab" * 32


def test_era_config_parses_marblerun_fields_case_insensitively() -> None:
    era = parse_era_config(
        json.dumps(
            {
                "securityversion": 2,
                "UniqueID": MRENCLAVE.upper(),
                "ProductID": 3,
                "Debug": True,
                "AcceptedTCBStatuses": ["SWHardeningNeeded"],
                "Unknown": "ignored",
            }
        ).encode(),
        "era.json",
    )
    assert (era.security_version, era.unique_id, era.product_id, era.debug) == (2, MRENCLAVE, 3, True)
    assert era.accepted_tcb_statuses == ("SWHardeningNeeded",)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ("[]", "JSON object"),
        ("{", "not valid JSON"),
        ('{"UniqueID": "abc"}', "UniqueID must be 64 hex digits"),
        (
            '{"SignerID": "' + "ab" * 32 + '", "ProductID": 70000}',
            "ProductID must be an integer from 0 to 65535",
        ),
        ('{"UniqueID": "' + "ab" * 32 + '", "Debug": "yes"}', "Debug must be true or false"),
        ('{"UniqueID": "' + "ab" * 32 + '", "AcceptedTCBStatuses": "UpToDate"}', "list of strings"),
        ('{"SecurityVersion": 1, "ProductID": 1}', "neither UniqueID nor SignerID"),
    ],
)
def test_bad_era_configs_name_the_field(doc: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_era_config(doc.encode(), "era.json")
    assert message in info.value.message and "era.json" in info.value.message


# -------------------------------------------------------------------- client certificates (users)


@pytest.fixture
def user_server(tmp_path: Path) -> Iterator[tuple[str, trustme.LeafCert, Path]]:
    """A TLS server whose certificate the pinned root signed, requiring a client certificate
    issued by a user CA, and echoing the SHA-256 of the client's leaf certificate."""
    pki = StubPki.create()
    user_ca = trustme.CA()
    user = user_ca.issue_cert("alice@example")

    async def whoami(request: web.Request) -> web.Response:
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        return jsend({"leaf": hashlib.sha256(der).hexdigest() if der else None})

    def require_users(ctx: ssl.SSLContext) -> None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        user_ca.configure_trust(ctx)

    app = web.Application()
    app.router.add_get("/whoami", whoami)
    server = StubServer(app, pki.listener, configure=require_users)
    pin = tmp_path / "root.pem"
    pin.write_bytes(pki.root.cert_pem)
    try:
        yield server.addr, user, pin
    finally:
        server.stop()


def test_the_sdk_presents_the_users_client_certificate(
    user_server: tuple[str, trustme.LeafCert, Path], tmp_path: Path
) -> None:
    addr, user, pin = user_server
    root = load_pinned_root(pin)
    assert root is not None
    cert_file, key_file = tmp_path / "alice.crt", tmp_path / "alice.key"
    user.cert_chain_pems[0].write_to_path(str(cert_file))
    user.private_key_pem.write_to_path(str(key_file))

    with CoordinatorClient(addr, root, client_cert=(cert_file, key_file)) as client:
        data = client._request("GET", "/whoami")
    leaf_der = x509.load_pem_x509_certificate(user.cert_chain_pems[0].bytes()).public_bytes(
        serialization.Encoding.DER
    )
    assert data == {"leaf": hashlib.sha256(leaf_der).hexdigest()}

    with CoordinatorClient(addr, root) as anonymous, pytest.raises(CoordinatorError, match=r"TLS|reach"):
        anonymous._request("GET", "/whoami")


def test_an_unloadable_client_key_never_shows_its_content(tmp_path: Path) -> None:
    pki = StubPki.create()
    secret_marker = "TOP-SECRET-KEY-MATERIAL-4242"
    cert_file, key_file = tmp_path / "u.crt", tmp_path / "u.key"
    cert_file.write_bytes(pki.root.cert_pem)
    key_file.write_text(f"-----BEGIN PRIVATE KEY-----\n{secret_marker}\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError) as info:
        pinned_context(pki.root.cert, (cert_file, key_file))
    assert secret_marker not in info.value.diagnostics()
    assert "-k/--key" in info.value.message


# -------------------------------------------------------------------------------- manifest checks


def test_manifest_info_check_catches_a_wrong_fingerprint_or_signature() -> None:
    pki, other = StubPki.create(), StubPki.create()
    raw = b'{"Packages":{}}'
    good = ManifestInfo(raw, hashlib.sha256(raw).hexdigest(), sign_manifest(pki.root.key, raw))
    good.check(pki.root.cert)
    with pytest.raises(AttestationError, match="hashes to"):
        ManifestInfo(raw + b" ", good.fingerprint, good.signature).check(pki.root.cert)
    with pytest.raises(AttestationError, match="signature does not verify"):
        ManifestInfo(raw, good.fingerprint, sign_manifest(other.root.key, raw)).check(pki.root.cert)


def test_recovery_secrets_with_bad_base64_are_refused_without_echoing_them(tmp_path: Path) -> None:
    pki = StubPki.create()
    secret_like = "c2VjcmV0LXJlY292ZXJ5LWRhdGE=!!"

    async def manifest_post(request: web.Request) -> web.Response:
        return jsend({"RecoverySecrets": {"alice": secret_like}})

    app = web.Application()
    app.router.add_post("/api/v2/manifest", manifest_post)
    server = StubServer(app, pki.listener)
    try:
        with CoordinatorClient(server.addr, pki.root.cert) as client, pytest.raises(CoordinatorError) as info:
            client.set_manifest(b"{}")
    finally:
        server.stop()
    assert "RecoverySecrets.alice" in info.value.message
    assert secret_like not in info.value.diagnostics()


# --------------------------------------------------------------------------------- connect (SDK)


def test_connect_pins_on_first_contact_and_reuses_the_pin(tmp_path: Path) -> None:
    pki = StubPki.create()

    async def quote(request: web.Request) -> web.Response:
        return jsend({"cert": pki.chain_pem, "quote": ""})

    async def status(request: web.Request) -> web.Response:
        return jsend({"code": 3, "message": STATUS_3})

    app = web.Application()
    app.router.add_get("/api/v2/quote", quote)
    app.router.add_get("/api/v2/status", status)
    server = StubServer(app, pki.listener)
    warnings: list[str] = []
    trust = TrustSettings(cert_path=tmp_path / "cfg" / "pin.pem", insecure=True, nonce=b"n")
    now = dt.datetime.now(dt.UTC)
    try:
        first = connect(server.addr, trust, now=now, warn=warnings.append)
        with first.client:
            assert first.pinned and not first.attested and first.simulation
            assert first.client.status().code == 3
        assert (tmp_path / "cfg" / "pin.pem").read_bytes() == pki.root.cert_pem
        assert any("SIMULATION" in w for w in warnings)

        warnings.clear()
        second = connect(server.addr, TrustSettings(cert_path=trust.cert_path), now=now, warn=warnings.append)
        with second.client:
            assert not second.pinned and second.cert_quote.root == pki.root.cert
        assert warnings == []
    finally:
        server.stop()


def test_public_exports() -> None:
    assert set(client_pkg.__all__) == {
        "DEFAULT_ACCEPTED_TCB_STATUSES",
        "CertQuote",
        "Connection",
        "CoordinatorClient",
        "EndpointMissing",
        "EraConfig",
        "ManifestInfo",
        "NotFromPinnedRoot",
        "PIN_FILE_ENV",
        "PendingUpdateInfo",
        "PinnedRootContext",
        "RecoverAnswer",
        "SignedUpdateLog",
        "Status",
        "TrustSettings",
        "UpdateAnswer",
        "base_url",
        "clean_text",
        "connect",
        "coordinator_report_data",
        "decode_envelope",
        "default_cert_path",
        "load_pinned_root",
        "manifest_json",
        "parse_era_config",
        "pin_name",
        "pin_path",
        "pinned_context",
        "save_pinned_root",
        "verify_coordinator_quote",
    }
    for name in client_pkg.__all__:
        assert getattr(client_pkg, name) is not None


def test_httpx_transport_injection_works_for_in_memory_tests() -> None:
    """The SDK takes an httpx transport, so it can be driven without sockets."""
    pki = StubPki.create()
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if request.url.path.startswith("/api/v2/"):
            return httpx.Response(405, content=b'{"status":"error","data":null}\n')
        return httpx.Response(
            200, json={"status": "success", "data": {"StatusCode": 2, "StatusMessage": "ok"}}
        )

    with CoordinatorClient("h:1", pki.root.cert, transport=httpx.MockTransport(handler)) as client:
        status = client.status()
    assert (status.code, status.message) == (2, "ok")
    assert calls == ["/api/v2/status", "/status"]


def test_cli_user_cert_options_reach_the_sdk(
    user_server: tuple[str, trustme.LeafCert, Path], tmp_path: Path
) -> None:
    """-c/--cert and -k/--key (for the user-authenticated commands to come) end up as the TLS
    client certificate; giving only one of them is a usage error."""
    addr, user, pin = user_server
    cert_file, key_file = tmp_path / "alice.crt", tmp_path / "alice.key"
    user.cert_chain_pems[0].write_to_path(str(cert_file))
    user.private_key_pem.write_to_path(str(key_file))
    root = load_pinned_root(pin)
    assert root is not None

    @click.command()
    @user_cert_options
    def whoami(cert: Path | None, key: Path | None) -> None:
        with CoordinatorClient(addr, root, client_cert=client_cert_pair(cert, key)) as client:
            click.echo(client._request("GET", "/whoami")["leaf"])

    ok = CliRunner().invoke(whoami, ["-c", str(cert_file), "-k", str(key_file)])
    assert ok.exit_code == 0, ok.output
    leaf = x509.load_pem_x509_certificate(cert_file.read_bytes()).public_bytes(serialization.Encoding.DER)
    assert ok.stdout.strip() == hashlib.sha256(leaf).hexdigest()
    half = CliRunner().invoke(whoami, ["-c", str(cert_file)])
    assert half.exit_code == 2 and "-k/--key" in half.output
