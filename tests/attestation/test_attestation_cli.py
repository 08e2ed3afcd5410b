"""``marblekeep attestation verify``: verdicts, explanations, JSON, exit codes (CliRunner, subprocess)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from attestation_vectors import SGX_MRENCLAVE, TDX_MRTD, VECTORS
from click.testing import CliRunner, Result

from marblekeep.attestation.evidence import add_oe_header
from marblekeep.cli.main import main

AT = "2025-06-25T00:00:00Z"
SGX = str(VECTORS / "sgx_quote")
SGX_COLLATERAL = str(VECTORS / "sgx_quote_collateral.json")


def manifest(tmp_path: Path, unique_id: str = SGX_MRENCLAVE, statuses: tuple[str, ...] = ()) -> str:
    package: dict[str, object] = {"UniqueID": unique_id}
    if statuses:
        package["AcceptedTCBStatuses"] = list(statuses)
    document = {
        "Packages": {"backend": package, "td": {"TDX": {"MRTD": TDX_MRTD}}},
        "Marbles": {"backend": {"Package": "backend"}, "guest": {"Package": "td"}},
    }
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(document))
    return str(path)


def run(*args: str) -> Result:
    return CliRunner().invoke(main, ["attestation", "verify", *args], catch_exceptions=False)


def test_verified_without_package() -> None:
    result = run(SGX, "--collateral", SGX_COLLATERAL, "--at", AT)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "verdict: VERIFIED" in lines
    assert "TCB status: ConfigurationAndSWHardeningNeeded" in lines
    assert "advisories: INTEL-SA-00289, INTEL-SA-00615" in lines
    assert f"MRENCLAVE: {SGX_MRENCLAVE}" in lines
    assert "ISVSVN: 0" in lines and "debug: false" in lines
    assert any(
        line.startswith("collateral: sgx/00A067110000/processor, valid 2025-06-19T10:56:11Z")
        for line in lines
    )


def test_accepted_by_package(tmp_path: Path) -> None:
    statuses = ("SWHardeningNeeded", "ConfigurationAndSWHardeningNeeded")
    result = run(
        SGX, "--collateral", SGX_COLLATERAL, "--at", AT, "--manifest", manifest(tmp_path, statuses=statuses),
        "--package", "backend",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "verdict: ACCEPTED (package backend)" in result.output


def test_refused_with_every_failed_check(tmp_path: Path) -> None:
    other = "6b28" + "00" * 28 + "a1c0"
    result = run(
        SGX, "--collateral", SGX_COLLATERAL, "--at", AT, "--manifest", manifest(tmp_path, unique_id=other),
        "--package", "backend",
    )  # fmt: skip
    assert result.exit_code == 1
    assert "verdict: REFUSED (package backend)" in result.output
    assert (
        "failed check: Packages.backend.AcceptedTCBStatuses: TCB status ConfigurationAndSWHardeningNeeded"
        " is not in AcceptedTCBStatuses [UpToDate, SWHardeningNeeded] (the default)" in result.output
    )
    assert (
        "failed check: Packages.backend.UniqueID: MRENCLAVE 33d8…2fbb does not match package backend UniqueID"
        " 6b28…a1c0" in result.output
    )
    assert "TCB status: ConfigurationAndSWHardeningNeeded" in result.output  # the facts are still shown


def test_json_output(tmp_path: Path) -> None:
    result = run(
        SGX, "--collateral", str(VECTORS), "--at", AT, "--manifest", manifest(tmp_path),
        "--package", "backend", "--json",
    )  # fmt: skip
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["verdict"] == "refused" and report["verified"] is True and report["accepted"] is False
    assert report["tcb_status"] == "ConfigurationAndSWHardeningNeeded"
    assert report["advisory_ids"] == ["INTEL-SA-00289", "INTEL-SA-00615"]
    assert report["measurements"]["MRENCLAVE"] == SGX_MRENCLAVE
    assert report["collateral"]["not_after"] == "2025-07-19T10:01:18Z"
    assert report["error"]["code"] == "attestation_refused"
    assert [c["field"] for c in report["failed_checks"]] == ["Packages.backend.AcceptedTCBStatuses"]


def test_expired_collateral() -> None:
    result = run(SGX, "--collateral", SGX_COLLATERAL, "--at", "2025-07-19T10:01:19Z", "--json")
    assert result.exit_code == 1
    report = json.loads(result.output)
    assert report["verified"] is False and report["accepted"] is None
    assert report["error"]["message"].startswith("collateral expired 2025-07-19T10:01:18Z")


def test_tdx_quote_and_tdx_package(tmp_path: Path) -> None:
    path = manifest(tmp_path)
    ok = run(
        str(VECTORS / "tdx_quote"),
        "--collateral",
        str(VECTORS),
        "--at",
        AT,
        "--manifest",
        path,
        "--package",
        "td",
    )
    assert ok.exit_code == 0, ok.output
    assert f"MRTD: {TDX_MRTD}" in ok.output and "TCB status: UpToDate" in ok.output
    refused = run(
        str(VECTORS / "tdx_quote"), "--collateral", str(VECTORS), "--at", AT, "--manifest", path, "--package",
        "backend",
    )  # fmt: skip
    assert refused.exit_code == 1
    assert "package backend describes an SGX enclave but the quote is a TDX quote" in refused.output


def test_tdx_quote_outdated() -> None:
    result = run(
        str(VECTORS / "tdx_quote_outdated"),
        "--collateral", str(VECTORS / "tdx_quote_outdated_collateral.json"),
        "--at", "2026-02-25T00:00:00Z",
    )  # fmt: skip
    assert result.exit_code == 1
    assert "verdict: NOT VERIFIED" in result.output and "No matching TCB level found" in result.output


def test_collateral_for_another_platform() -> None:
    result = run(SGX, "--collateral", str(VECTORS / "tdx_quote_collateral.json"), "--at", AT)
    assert result.exit_code == 1
    assert "holds no collateral for this quote's platform sgx/00A067110000/processor" in result.output


@pytest.mark.parametrize("encoding", ["oe", "hex", "base64"])
def test_quote_file_forms(tmp_path: Path, encoding: str) -> None:
    raw = (VECTORS / "sgx_quote").read_bytes()
    path = tmp_path / "quote"
    if encoding == "oe":
        path.write_bytes(add_oe_header(raw))
    elif encoding == "hex":
        path.write_text(raw.hex() + "\n")
    else:
        path.write_text(base64.b64encode(raw).decode())
    result = run(str(path), "--collateral", SGX_COLLATERAL, "--at", AT)
    assert result.exit_code == 0, result.output
    assert ("with an Open Enclave header" in result.output) is (encoding == "oe")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([SGX, "--at", AT], "exactly one of --collateral"),
        ([SGX, "--collateral", SGX_COLLATERAL, "--at", "2025-06-25"], "no time zone"),
        ([SGX, "--collateral", SGX_COLLATERAL, "--at", "yesterday"], "not an RFC 3339 time"),
        (
            [SGX, "--collateral", SGX_COLLATERAL, "--package", "backend"],
            "--manifest and --package go together",
        ),
    ],
)
def test_usage_errors(args: list[str], message: str) -> None:
    result = run(*args)
    assert result.exit_code == 2
    assert message in result.output


def test_usage_errors_with_files(tmp_path: Path) -> None:
    unknown = run(SGX, "--collateral", SGX_COLLATERAL, "--manifest", manifest(tmp_path), "--package", "nope")
    assert unknown.exit_code == 2 and "--package 'nope' is not in" in unknown.output
    broken = tmp_path / "broken.json"
    broken.write_text('{"tcb_info": 1}')
    bad = run(SGX, "--collateral", str(broken), "--at", AT)
    assert bad.exit_code == 2 and "pck_crl_issuer_chain: missing" in bad.output
    invalid = tmp_path / "invalid.json"
    invalid.write_text('{"Packages": {}}')
    result = run(SGX, "--collateral", SGX_COLLATERAL, "--manifest", str(invalid), "--package", "x")
    assert result.exit_code == 2 and "--manifest" in result.output
    assert run(str(tmp_path / "missing"), "--collateral", SGX_COLLATERAL).exit_code == 2


def test_garbage_quote_is_refused_not_crashed(tmp_path: Path) -> None:
    path = tmp_path / "quote.bin"
    path.write_bytes(b"\x03\x00\x02\x00" + bytes(10))
    result = run(str(path), "--collateral", SGX_COLLATERAL, "--at", AT)
    assert result.exit_code == 1 and "too short" in result.output


def test_subprocess_end_to_end(tmp_path: Path) -> None:
    """The installed entry point, as a user runs it (collateral from a directory)."""
    collateral_dir = tmp_path / "collateral"
    collateral_dir.mkdir()
    shutil.copy(VECTORS / "sgx_quote_collateral.json", collateral_dir / "sgx.json")
    script = Path(sys.executable).parent / "marblekeep"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "marblekeep.cli.main"]
    done = subprocess.run(
        [*command, "attestation", "verify", SGX, "--collateral", str(collateral_dir), "--at", AT, "--json"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    report = json.loads(done.stdout)
    assert report["verdict"] == "verified" and report["tee"] == "sgx"


def test_docs_example_is_the_real_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/attestation.md's explanation example is exactly what the CLI prints."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "attestation.md").read_text()

    def block_after(marker: str) -> str:
        rest = doc.split(f"<!-- {marker} -->", 1)[1]
        return rest.split("```", 2)[1].split("\n", 1)[1]

    manifest_path = tmp_path / "manifest.json"
    manifest_path.write_text(block_after("attestation-doc-manifest"))
    command, *expected = block_after("attestation-doc-output").rstrip("\n").split("\n")
    args = command.removeprefix("$ marblekeep ").split()
    args = [str(manifest_path) if a == "manifest.json" else a for a in args]
    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 1
    assert result.output.rstrip("\n").split("\n") == expected
