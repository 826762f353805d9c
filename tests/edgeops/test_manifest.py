from __future__ import annotations

import json

import pytest

from edgeops.errors import ArtifactFormatError
from edgeops.manifest import Manifest, parse_semver


def test_semver_orders_releases_and_prereleases() -> None:
    versions = ["1.0.0", "1.0.0-rc.1", "0.9.12", "1.0.0-alpha", "1.0.0-alpha.1", "1.10.0", "1.2.0"]
    ordered = sorted(versions, key=parse_semver)
    assert ordered == ["0.9.12", "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-rc.1", "1.0.0", "1.2.0", "1.10.0"]
    with pytest.raises(ValueError):
        parse_semver("1.0")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"not json", "not valid JSON"),
        (b"[]", "not a JSON object"),
        (json.dumps({"schema": 99}).encode(), "unsupported manifest schema"),
        (json.dumps({"schema": 1, "version": "one"}).encode(), "semantic version"),
        (
            json.dumps(
                {"schema": 1, "version": "1.0.0", "files": [{"path": "a", "sha256": "xyz", "size": 1}]}
            ).encode(),
            "malformed",
        ),
    ],
)
def test_malformed_manifests_are_rejected_with_a_reason(raw: bytes, message: str) -> None:
    with pytest.raises(ArtifactFormatError, match=message):
        Manifest.from_bytes(raw)
