"""``--store URL``: parsing, clear errors naming the part and the fix, and the CLI option."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from marblekeep.cli.main import main
from marblekeep.errors import ConfigError
from marblekeep.store.etcd import EtcdEndpoint, EtcdTLS
from marblekeep.store.location import EtcdLocation, SQLiteLocation, parse_store_url
from testsupport import REPO_ROOT, check_command_line


@pytest.mark.parametrize("url", [None, "", "  ", "sqlite://", "SQLITE://"])
def test_default_is_sqlite(url: str | None) -> None:
    assert parse_store_url(url) == SQLiteLocation()


def test_etcd_endpoints_and_prefix() -> None:
    loc = parse_store_url("etcd://127.0.0.1:2379,[::1]:2380,etcd-2.example.org/prod/eu-1")
    assert isinstance(loc, EtcdLocation)
    assert loc.config.endpoints == (
        EtcdEndpoint("127.0.0.1", 2379),
        EtcdEndpoint("::1", 2380),
        EtcdEndpoint("etcd-2.example.org", 2379),
    )
    assert loc.config.prefix == "/prod/eu-1/"
    assert loc.config.tls is None
    assert loc.describe() == "etcd://127.0.0.1:2379,[::1]:2380,etcd-2.example.org:2379/prod/eu-1"
    assert parse_store_url("etcd://h:1").config.prefix == "/marblekeep/"  # type: ignore[union-attr]
    assert parse_store_url("etcd://h:1/").config.prefix == "/marblekeep/"  # type: ignore[union-attr]


def test_etcds_with_tls_files(tmp_path: Path) -> None:
    ca, cert, key = (tmp_path / n for n in ("ca.pem", "c.pem", "k.pem"))
    for f in (ca, cert, key):
        f.write_text("PEM")
    loc = parse_store_url("etcds://10.0.0.1:2379", ca_file=ca, cert_file=cert, key_file=key)
    assert isinstance(loc, EtcdLocation) and loc.config.tls == EtcdTLS(ca, cert, key)
    assert loc.describe().startswith("etcds://")
    only_roots = parse_store_url("etcds://10.0.0.1:2379")
    assert isinstance(only_roots, EtcdLocation) and only_roots.config.tls == EtcdTLS()


@pytest.mark.parametrize(
    ("url", "names"),
    [
        ("http://127.0.0.1:2379", ["unknown scheme 'http'", "etcd://HOST:PORT"]),
        ("127.0.0.1:2379", ["no scheme"]),
        ("etcd://", ["no etcd endpoint"]),
        ("etcd://127.0.0.1:0", ["endpoint 1", "invalid port '0'", "1 to 65535"]),
        ("etcd://a:1,b:99999", ["endpoint 2", "invalid port '99999'"]),
        ("etcd://a:x", ["invalid port 'x'"]),
        ("etcd://a:1,,b:2", ["endpoint 2 has no host"]),
        ("etcd://::1:2379", ["brackets", "[::1]:2379"]),
        ("etcd://[::zz]:2379", ["malformed IPv6"]),
        ("etcd://bad_host!:1", ["invalid host 'bad_host!'"]),
        ("etcd://a:1,a:1", ["listed twice"]),
        ("etcd://a:1/pre fix", ["invalid segment 'pre fix'"]),
        ("etcd://a:1/a//b", ["invalid segment ''"]),
        ("etcd://a:1?cacert=x", ["--store-ca-file"]),
        ("sqlite:///tmp/x.db", ["data directory", "--seal-dir"]),
    ],
)
def test_bad_urls_name_the_part_and_the_fix(url: str, names: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_store_url(url)
    message = info.value.message
    assert message.startswith("--store ")
    for name in names:
        assert name in message, message


def test_credentials_in_the_url_are_refused_and_never_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        parse_store_url("etcd://root:hunter2@127.0.0.1:2379")
    assert "hunter2" not in info.value.message and "root" not in info.value.message
    assert "client certificate" in info.value.message


def test_tls_option_mistakes(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("PEM")
    with pytest.raises(ConfigError, match="use etcds://"):
        parse_store_url("etcd://a:1", ca_file=pem)
    with pytest.raises(ConfigError, match="go together"):
        parse_store_url("etcds://a:1", cert_file=pem)
    with pytest.raises(ConfigError, match=r"--store-ca-file .*no such file"):
        parse_store_url("etcds://a:1", ca_file=tmp_path / "missing.pem")
    with pytest.raises(ConfigError, match="need --store etcds"):
        parse_store_url("", ca_file=pem)


def test_cli_refuses_a_bad_store_url_before_starting(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["coordinator", "--simulation", "--seal-dir", str(tmp_path), "--store", "etcd://127.0.0.1:70000"],
    )
    assert result.exit_code == 2
    assert "invalid port '70000'" in result.output
    assert "Traceback" not in result.output
    env_result = CliRunner().invoke(
        main,
        ["coordinator", "--simulation", "--seal-dir", str(tmp_path)],
        env={"MARBLEKEEP_STORE": "ftp://x"},
    )
    assert env_result.exit_code == 2 and "unknown scheme 'ftp'" in env_result.output


def test_help_documents_the_store_options() -> None:
    result = CliRunner().invoke(main, ["coordinator", "--help"])
    assert result.exit_code == 0
    for option in (
        "--store URL",
        "MARBLEKEEP_STORE",
        "--store-ca-file",
        "--store-cert-file",
        "--store-key-file",
    ):
        assert option in result.output


def test_the_commands_in_the_ha_docs_are_real() -> None:
    """Every ``marblekeep ...`` line of docs/ha.md (with ``\\`` continuations) uses real options and
    a --store URL that parses."""
    text = (REPO_ROOT / "docs" / "ha.md").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("marblekeep ")]
    assert len(lines) >= 2
    for line in lines:
        argv = shlex.split(line.split("#")[0])
        check_command_line(argv)
        parse_store_url(argv[argv.index("--store") + 1])
