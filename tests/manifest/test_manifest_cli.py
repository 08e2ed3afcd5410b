"""``marblekeep manifest validate`` and ``marblekeep manifest signature``."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from manifest_support import SIGNER, base, dumps

from marblekeep.cli.main import main
from marblekeep.manifest import yaml_to_json

VALID_YAML = f"""\
Packages:
  pkg: {{SignerID: "{SIGNER}", ProductID: 1, SecurityVersion: 1}}
Marbles:
  m: {{Package: pkg}}
""".encode()


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.json"
    good.write_bytes(dumps(base()))
    bad = base()
    bad["Marbles"]["m"]["Package"] = "pkgg"
    bad["Packages"]["dbg"] = {"Debug": True, "SignerID": "ab"}
    bad["Marbles"]["d"] = {"Package": "dbg"}
    bad_path = tmp_path / "bad.json"
    bad_path.write_bytes(dumps(bad))
    yaml_path = tmp_path / "good.yaml"
    yaml_path.write_bytes(VALID_YAML)
    not_yaml = tmp_path / "broken.yaml"
    not_yaml.write_bytes(b"Packages: [\n")
    return {"good": good, "bad": bad_path, "yaml": yaml_path, "broken": not_yaml}


def test_validate_all_valid_exits_zero(files: dict[str, Path]) -> None:
    result = CliRunner().invoke(main, ["manifest", "validate", str(files["good"]), str(files["yaml"])])
    assert result.exit_code == 0, result.output
    assert result.output == f"{files['good']}: valid\n{files['yaml']}: valid\n"


def test_validate_reports_problems_and_warnings(files: dict[str, Path]) -> None:
    result = CliRunner().invoke(main, ["manifest", "validate", str(files["good"]), str(files["bad"])])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0] == f"{files['good']}: valid"
    assert lines[1] == f"{files['bad']}: invalid"
    assert lines[2] == '  Marbles.m.Package: no package "pkgg" (did you mean "pkg"?)'
    assert lines[3].startswith("  warning: Packages.dbg.ProductID: missing")
    assert lines[4].startswith("  warning: Packages.dbg.SecurityVersion: missing")
    assert len(lines) == 5


def test_validate_unparseable_yaml_is_invalid_not_a_crash(files: dict[str, Path]) -> None:
    result = CliRunner().invoke(main, ["manifest", "validate", str(files["broken"])])
    assert result.exit_code == 1
    assert result.output.startswith(f"{files['broken']}: invalid\n  neither JSON nor valid YAML")


def test_validate_json_output(files: dict[str, Path]) -> None:
    args = ["manifest", "validate", "--json", str(files["good"]), str(files["bad"])]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    records = [json.loads(line) for line in result.output.splitlines()]
    assert records[0] == {"file": str(files["good"]), "valid": True, "problems": [], "warnings": []}
    assert records[1]["file"] == str(files["bad"])
    assert records[1]["valid"] is False
    assert records[1]["problems"] == [
        {"path": "Marbles.m.Package", "message": 'no package "pkgg" (did you mean "pkg"?)'}
    ]
    assert [w["path"] for w in records[1]["warnings"]] == [
        "Packages.dbg.ProductID",
        "Packages.dbg.SecurityVersion",
    ]


@pytest.mark.parametrize("args", [["manifest", "validate"], ["manifest", "validate", "/nonexistent/x.json"]])
def test_validate_usage_errors_exit_two(args: list[str]) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2


def test_signature_of_json_is_sha256_of_file(files: dict[str, Path]) -> None:
    result = CliRunner().invoke(main, ["manifest", "signature", str(files["good"])])
    assert result.exit_code == 0
    assert result.output == hashlib.sha256(files["good"].read_bytes()).hexdigest() + "\n"


def test_signature_of_yaml_is_sha256_of_converted_json(files: dict[str, Path]) -> None:
    result = CliRunner().invoke(main, ["manifest", "signature", str(files["yaml"])])
    assert result.exit_code == 0
    expected = hashlib.sha256(yaml_to_json(VALID_YAML)).hexdigest()
    assert expected != hashlib.sha256(VALID_YAML).hexdigest()
    assert result.output == expected + "\n"


def test_signature_of_garbage_fails_cleanly(files: dict[str, Path]) -> None:
    result = CliRunner().invoke(main, ["manifest", "signature", str(files["broken"])])
    assert result.exit_code == 1
    assert "neither JSON nor valid YAML" in result.output
    assert "Traceback" not in result.output


def test_real_subprocess(files: dict[str, Path]) -> None:
    exe = Path(sys.executable).parent / "marblekeep"
    if not exe.exists():
        pytest.skip(f"{exe} is not installed")
    ok = subprocess.run(
        [str(exe), "manifest", "validate", str(files["good"])], capture_output=True, text=True, check=False
    )
    assert (ok.returncode, ok.stdout) == (0, f"{files['good']}: valid\n")
    bad = subprocess.run(
        [str(exe), "manifest", "validate", str(files["bad"])], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 1
    assert "did you mean" in bad.stdout
    sig = subprocess.run(
        [str(exe), "manifest", "signature", str(files["good"])], capture_output=True, text=True, check=False
    )
    assert sig.stdout.strip() == hashlib.sha256(files["good"].read_bytes()).hexdigest()
    usage = subprocess.run([str(exe), "manifest", "validate"], capture_output=True, text=True, check=False)
    assert usage.returncode == 2


# ----------------------------------------------------- which syntax applies: by the file's name


JSON_WITH_TRAILING_COMMA = (
    b'{\n  "Packages": {"pkg": {"SignerID": "ab"}},\n  "Marbles": {"m": {"Package": "pkg"}},\n}\n'
)


@pytest.mark.parametrize(
    ("content", "where"),
    [
        (JSON_WITH_TRAILING_COMMA, "(line 4, column 1)"),
        (b"{'Packages': {}}", "(line 1, column 2)"),
    ],
)
def test_a_json_file_must_be_strict_json(tmp_path: Path, content: bytes, where: str) -> None:
    # YAML would accept both (and the uploaded bytes would then differ from the file's).
    yaml_to_json(content)
    path = tmp_path / "manifest.json"
    path.write_bytes(content)
    result = CliRunner().invoke(main, ["manifest", "validate", str(path)])
    assert result.exit_code == 1
    assert f"{path}: invalid" in result.output
    assert "not valid JSON" in result.output and where in result.output
    assert "a .json file must be strict JSON" in result.output
    signature = CliRunner().invoke(main, ["manifest", "signature", str(path)])
    assert signature.exit_code == 1
    assert signature.output.startswith(f"Error: {path} is not valid JSON")
    assert where in signature.output


def test_the_same_text_in_a_yaml_file_is_yaml(tmp_path: Path) -> None:
    path = tmp_path / "manifest.YML"
    path.write_bytes(JSON_WITH_TRAILING_COMMA.replace(b'"ab"', f'"{SIGNER}"'.encode()))
    result = CliRunner().invoke(main, ["manifest", "validate", str(path)])
    assert "not valid JSON" not in result.output
    assert result.output.startswith(f"{path}: ")


def test_stdin_starting_with_a_brace_is_strict_json(files: dict[str, Path]) -> None:
    bad = CliRunner().invoke(main, ["manifest", "validate", "-"], input=JSON_WITH_TRAILING_COMMA)
    assert bad.exit_code == 1
    assert "not valid JSON" in bad.output and "(line 4, column 1)" in bad.output
    good = CliRunner().invoke(main, ["manifest", "signature", "-"], input=files["good"].read_bytes())
    assert good.exit_code == 0
    assert good.output.strip() == hashlib.sha256(files["good"].read_bytes()).hexdigest()


def test_stdin_yaml_is_converted(files: dict[str, Path]) -> None:
    result = CliRunner().invoke(main, ["manifest", "signature", "-"], input=VALID_YAML)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == hashlib.sha256(yaml_to_json(VALID_YAML)).hexdigest()
