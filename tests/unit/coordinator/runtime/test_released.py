"""coordinator.runtime.released: which object infos of the releases store make a notice."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from nats.js import api as js_api

from coordinator.runtime.released import notice_of
from protocol.messages import ReleaseNotice, ReleaseRef

BUNDLE = b"a bundle's bytes"
SHA = hashlib.sha256(BUNDLE).digest()


def info(**over: object) -> bytes:
    """An object info as nats-py's object store publishes it when a put ends."""
    got = js_api.ObjectInfo(name="hello/2.0.0", bucket="fw-default-releases", nuid="N1",
                            size=len(BUNDLE), chunks=1,
                            digest="SHA-256=" + base64.urlsafe_b64encode(SHA).decode())
    return json.dumps({**got.as_dict(), **over}).encode()


def test_a_finished_upload_of_a_release_makes_a_notice_with_its_digest() -> None:
    assert notice_of(info()) == ReleaseNotice(release=ReleaseRef(
        service="hello", version="2.0.0", digest="sha256:" + SHA.hex(), size=len(BUNDLE)))


def test_the_digest_may_come_without_its_padding() -> None:
    """Go's clients write base64url without '=' padding (nats-py with it)."""
    bare = "SHA-256=" + base64.urlsafe_b64encode(SHA).decode().rstrip("=")
    notice = notice_of(info(digest=bare))
    assert notice is not None and notice.release.digest == "sha256:" + SHA.hex()


@pytest.mark.parametrize("data", [
    pytest.param(info(deleted=True), id="deleted"),
    pytest.param(info(name="hello"), id="no-version"),
    pytest.param(info(name="hello/"), id="empty-version"),
    pytest.param(info(name="_hidden/1.0"), id="bad-service"),
    pytest.param(info(name="a b/1.0"), id="service-with-space"),
    pytest.param(info(digest=""), id="no-digest"),
    pytest.param(info(digest="SHA-512=" + base64.urlsafe_b64encode(SHA).decode()), id="sha512"),
    pytest.param(info(digest="SHA-256=" + base64.urlsafe_b64encode(SHA[:20]).decode()),
                 id="short"),
    pytest.param(info(digest="SHA-256=!!!notbase64"), id="not-base64"),
    pytest.param(info(size="big"), id="size-not-a-number"),
    pytest.param(b"{not json", id="not-json"),
    pytest.param(b"[]", id="not-an-object"),
    pytest.param(b'{"size": 3}', id="no-name"),
])
def test_what_is_not_a_finished_release_makes_no_notice(data: bytes) -> None:
    assert notice_of(data) is None
