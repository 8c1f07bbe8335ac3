"""The pure parts of the libvirt adapter: state/event tables and URIs."""

from pathlib import Path

import pytest

from meshcloud.core.errors import InvalidInput
from meshcloud.hypervisor.base import DomainState, EventKind
from meshcloud.hypervisor.libvirt_hv import (
    EMBED_QEMU_CONF,
    embed_root,
    embed_uri,
    map_event,
    map_state,
    prepare_embed_root,
)


@pytest.mark.parametrize(
    ("code", "state"),
    [(0, DomainState.OTHER), (1, DomainState.RUNNING), (2, DomainState.RUNNING),
     (3, DomainState.PAUSED), (4, DomainState.SHUTTING_DOWN), (5, DomainState.SHUTOFF),
     (6, DomainState.CRASHED), (7, DomainState.OTHER), (99, DomainState.OTHER)],
)  # fmt: skip
def test_map_state(code: int, state: DomainState) -> None:
    assert map_state(code) is state


@pytest.mark.parametrize(
    ("event", "detail", "expected"),
    [
        (0, 0, (EventKind.DEFINED, "added")),
        (1, 0, (EventKind.UNDEFINED, "removed")),
        (2, 0, (EventKind.STARTED, "booted")),
        (3, 0, (EventKind.SUSPENDED, "paused")),
        (3, 2, (EventKind.SUSPENDED, "io-error")),
        (4, 0, (EventKind.RESUMED, "unpaused")),
        (5, 0, (EventKind.STOPPED, "shutdown")),
        (5, 1, (EventKind.STOPPED, "destroyed")),
        (5, 2, (EventKind.STOPPED, "crashed")),
        (5, 5, (EventKind.STOPPED, "failed")),
        (6, 1, (EventKind.SHUTDOWN, "guest")),
        (8, 0, (EventKind.CRASHED, "panicked")),
        (5, 42, (EventKind.STOPPED, "detail-42")),
        (77, 0, (EventKind.OTHER, "detail-0")),
    ],
)
def test_map_event(event: int, detail: int, expected: tuple[EventKind, str]) -> None:
    assert map_event(event, detail) == expected


def test_embed_uri_round_trip() -> None:
    uri = embed_uri(Path("/var/lib/meshcloud/libvirt"))
    assert uri == "qemu:///embed?root=/var/lib/meshcloud/libvirt"
    assert embed_root(uri) == Path("/var/lib/meshcloud/libvirt")
    assert embed_root("qemu:///system") is None


@pytest.mark.parametrize(
    "root", ["relative/dir", "/a b", "/a&root=/b", "/a?x", "/a/../b", "/a\n", "/a%20"]
)
def test_embed_roots_with_odd_characters_are_refused(root: str) -> None:
    with pytest.raises(InvalidInput):
        embed_uri(Path(root))


def test_embed_roots_too_long_for_qemu_sockets_are_refused() -> None:
    embed_uri(Path("/" + "a" * 47))
    with pytest.raises(InvalidInput, match="shorter"):
        embed_uri(Path("/tmp/pytest-of-root/pytest-22/test_demo_appliance_lifecycle_0/libvirt"))


def test_embed_uri_with_two_roots_is_refused() -> None:
    with pytest.raises(InvalidInput):
        embed_root("qemu:///embed?root=/a&root=/b")


def test_prepare_embed_root_writes_qemu_conf(tmp_path: Path) -> None:
    prepare_embed_root(tmp_path / "root")
    text = (tmp_path / "root" / "etc" / "qemu.conf").read_text()
    assert text == EMBED_QEMU_CONF
    for line in ('user = "root"', 'security_driver = "none"', 'stdio_handler = "file"'):
        assert line in text
