"""docs/identities.md: every example loads through the real parsers and means what the text says."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest

from sds._util.peercred import PeerCredentials
from sds.provider.identities import (
    Identity,
    entitled,
    load_federated_bundle,
    load_identities,
    parse_identities,
)
from sds.spiffe.id import SpiffeId, TrustDomain

DOC = Path(__file__).resolve().parents[2] / "docs" / "identities.md"
TD = TrustDomain("example.org")
FENCE = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(DOC.read_text()) if lang == language]


def doc_identities() -> list[list[Identity]]:
    return [parse_identities(text, TD, f"{DOC.name} yaml block") for text in blocks("yaml")]


def creds(uid: int, gid: int = 100, pid: int = 4242) -> PeerCredentials:
    return PeerCredentials(pid=pid, uid=uid, gid=gid)


def test_every_yaml_example_loads() -> None:
    loaded = doc_identities()
    assert len(loaded) == 4
    assert [[i.name for i in ids] for ids in loaded] == [
        ["web"], ["api", "shared"], ["rotating"], ["db"],
    ]  # fmt: skip


def test_examples_load_from_files_and_a_directory(tmp_path: Path) -> None:
    """The same examples as files of a directory: read in name order, names unique."""
    for index, text in enumerate(blocks("yaml")):
        (tmp_path / f"{index:02d}-example.yaml").write_text(text)
    (tmp_path / "README.txt").write_text("ignored")
    names = [i.name for i in load_identities(tmp_path, TD)]
    assert names == ["web", "api", "shared", "rotating", "db"]


def test_complete_document_fields() -> None:
    (web,) = doc_identities()[0]
    assert web.spiffe_id == SpiffeId.parse("spiffe://example.org/svc/web")
    assert web.hint == "web"
    assert web.dns_sans == ("web.internal", "*.web.internal")
    assert web.ip_sans == ("10.0.0.7", "fd00::7")
    assert web.x509_ttl == dt.timedelta(minutes=30)
    assert web.jwt_ttl == dt.timedelta(minutes=2)
    assert web.expires == dt.datetime(2099, 1, 1, tzinfo=dt.UTC)
    assert web.labels == {"team": "payments"}
    assert web.description == "front end"
    # Rule 1: uid 1000 and a gid other than 0 and 4; rule 2: uid 2000 or 2001.
    assert web.entitles(creds(1000, gid=100))
    assert not web.entitles(creds(1000, gid=4))
    assert not web.entitles(creds(1000, gid=0))
    assert web.entitles(creds(2001, gid=0))
    assert not web.entitles(creds(2002))


def test_rules_example_means_what_the_comment_says() -> None:
    api, shared = doc_identities()[1]
    assert api.entitles(creds(1000, gid=1))
    assert api.entitles(creds(5, gid=2000))
    assert not api.entitles(creds(0, gid=2000))
    assert not api.entitles(creds(5, gid=1))
    assert shared.rules == ()
    assert shared.entitles(creds(0, gid=0))
    # Order: the first entitled identity is the caller's default SVID.
    assert [i.name for i in entitled((api, shared), creds(1000))] == ["api", "shared"]
    assert [i.name for i in entitled((api, shared), creds(7))] == ["shared"]


def test_lifetimes_example() -> None:
    (rotating,) = doc_identities()[2]
    assert rotating.x509_ttl == dt.timedelta(seconds=10)
    assert rotating.jwt_ttl == dt.timedelta(seconds=90)
    assert rotating.expires == dt.datetime(2030, 12, 31, 23, 59, 59, tzinfo=dt.UTC)
    assert not rotating.entitles(creds(1), now=dt.datetime(2031, 1, 1, tzinfo=dt.UTC))
    assert rotating.entitles(creds(1), now=dt.datetime(2030, 1, 1, tzinfo=dt.UTC))


def test_san_example() -> None:
    (db,) = doc_identities()[3]
    assert db.dns_sans == ("db.internal", "db")
    assert db.ip_sans == ("127.0.0.1", "::1")


@pytest.mark.parametrize("text", blocks("json"))
def test_federation_example_loads(tmp_path: Path, text: str) -> None:
    path = tmp_path / "partner.jwks"
    path.write_text(text)
    bundle = load_federated_bundle(TrustDomain("partner.example"), path)
    assert bundle.x509 is None
    assert bundle.jwt is not None
    assert sorted(bundle.jwt.keys) == ["partner-2026-11"]


def test_every_field_in_the_code_is_documented() -> None:
    text = DOC.read_text()
    for field in (
        "kind", "version", "sub_kind", "metadata.name", "metadata.description",
        "metadata.labels", "metadata.revision", "metadata.expires", "spec.spiffe.id",
        "spec.spiffe.hint", "spec.spiffe.x509.dns_sans", "spec.spiffe.x509.ip_sans",
        "spec.spiffe.x509.maximum_ttl", "spec.spiffe.x509.subject_template",
        "spec.spiffe.jwt.maximum_ttl", "spec.spiffe.jwt.extra_claims", "spec.rules.allow",
        "workload.unix.uid", "workload.unix.gid", "workload.unix.pid",
        "eq:", "not_eq:", "in:", "not_in:",
    ):  # fmt: skip
        assert f"`{field}" in text, field
