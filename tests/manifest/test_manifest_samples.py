"""MarbleRun's sample manifests judged as MarbleRun judges them; the repository's example."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from manifest_support import paths

from marblekeep.manifest import load_manifest, validate_manifest
from marblekeep.manifest.model import SecretType

REPO_ROOT = Path(__file__).resolve().parents[2]
ACCEPTED = [
    "helloworld.json",
    "helloc++.json",
    "estore.json",
    "gramine-hello.json",
    "gramine-nginx.json",
    "gramine-redis.json",
    "occlum-hello.json",
]


@pytest.mark.parametrize("name", ACCEPTED)
def test_accepted_samples_are_valid(marblerun_samples: Path, name: str) -> None:
    result = validate_manifest((marblerun_samples / name).read_bytes())
    assert result.valid, [str(p) for p in result.problems]


def test_nginx_sample_warns_about_dns_names_in_subject(marblerun_samples: Path) -> None:
    result = validate_manifest((marblerun_samples / "gramine-nginx.json").read_bytes())
    assert [w.path for w in result.warnings] == ["Secrets.ServerCert.Cert.Subject.DNSNames"]


def test_sample_manifest_is_refused_for_its_three_reasons(marblerun_samples: Path) -> None:
    result = validate_manifest((marblerun_samples / "sample-manifest.json").read_bytes())
    assert not result.valid
    found = {str(p) for p in result.problems}
    # 1. WriteSecret on secrets that are not user-defined.
    for index, name in enumerate(("symmetricKeyShared", "certShared", "rsaShared")):
        assert any(
            s.startswith(f"Roles.secrets-admin.ResourceNames[{index}]: grants WriteSecret on \"{name}\"")
            for s in found
        )
    # 2. Placeholder user certificates.
    for user in ("Alice", "Bob", "Admin"):
        assert f"Users.{user}.Certificate" in paths(result)
    # 3. raw used in an Env value.
    assert any(
        p.path == "Marbles.backendFirst.Parameters.Env.API_KEY" and '"raw" not defined' in p.message
        for p in result.problems
    )
    assert len(result.problems) == 7


def test_manifest_template_is_refused(marblerun_samples: Path) -> None:
    result = validate_manifest((marblerun_samples / "manifest-template.json").read_bytes())
    assert not result.valid
    assert "Roles.<RoleName>.ResourceNames" in paths(result)  # a string where a list belongs
    assert "Secrets.<SecretName>.Type" in paths(result)


def test_example_manifest_is_valid_and_complete() -> None:
    raw = (REPO_ROOT / "examples" / "manifest.json").read_bytes()
    result = validate_manifest(raw)
    assert result.valid, [str(p) for p in result.problems]
    assert result.warnings == ()
    manifest = load_manifest(raw)
    packages = manifest.packages
    assert packages["frontend"].unique_id and packages["frontend"].signer_id == ""
    assert packages["backend"].signer_id and packages["backend"].product_id is not None
    assert packages["analytics-td"].tdx is not None
    assert {s.type for s in manifest.secrets.values()} >= {
        SecretType.SYMMETRIC_KEY,
        SecretType.CERT_ECDSA,
        SecretType.PLAIN,
    }
    assert any(s.shared for s in manifest.secrets.values() if s.type is SecretType.SYMMETRIC_KEY)
    assert any(not s.shared for s in manifest.secrets.values() if s.type is SecretType.SYMMETRIC_KEY)
    text = raw.decode()
    for needle in (
        "{{ hex .MarbleRun.SealKey }}",
        "{{ pem .MarbleRun.MarbleCert.Cert }}",
        "{{ pem .MarbleRun.MarbleCert.Private }}",
        "{{ string .Secrets.",
    ):
        assert needle in text
    assert manifest.users and manifest.roles and manifest.tls and manifest.recovery_keys
    assert json.loads(raw)["Config"]["FeatureGates"]
