"""docs/manifest.md cannot rot: every JSON block is a valid manifest unless marked a fragment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from marblekeep.manifest import validate_manifest

DOC = Path(__file__).resolve().parents[2] / "docs" / "manifest.md"
FENCE = re.compile(r"(?P<before>[^\n]*)\n```json\n(?P<body>.*?)\n```", re.DOTALL)


def _blocks() -> list[tuple[int, bool, str]]:
    text = DOC.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start("body")) + 1
        fragment = match.group("before").strip() == "<!-- fragment -->"
        blocks.append((line, fragment, match.group("body")))
    return blocks


def test_doc_has_complete_and_fragment_blocks() -> None:
    blocks = _blocks()
    assert any(not fragment for _, fragment, _ in blocks)
    assert any(fragment for _, fragment, _ in blocks)


@pytest.mark.parametrize(
    ("line", "body"),
    [(line, body) for line, fragment, body in _blocks() if not fragment],
    ids=lambda v: f"line{v}" if isinstance(v, int) else "",
)
def test_every_complete_json_block_validates(line: int, body: str) -> None:
    result = validate_manifest(body.encode("utf-8"))
    assert result.valid, f"docs/manifest.md line {line}: {[str(p) for p in result.problems]}"
    assert result.warnings == ()


def test_doc_mentions_every_top_level_and_config_field() -> None:
    text = DOC.read_text(encoding="utf-8")
    for field in (
        "Packages", "Marbles", "Secrets", "Users", "Roles", "RecoveryKeys", "TLS", "Config",
        "Infrastructures", "Debug", "UniqueID", "SignerID", "ProductID", "SecurityVersion",
        "AcceptedTCBStatuses", "AcceptedAdvisories", "MRTD", "RTMR0", "MRSEAM", "MaxActivations",
        "DisableSecretBinding", "NoTemplates",
        "UserDefined", "ValidFor", "NotAfter", "ResourceType", "ResourceNames", "DisableClientAuth",
        "SealMode", "FeatureGates", "UpdateThreshold", "RecoveryThreshold", "RotateRootSecret",
    ):
        assert f"`{field}`" in text, field
    assert "examples/manifest.json" in text
