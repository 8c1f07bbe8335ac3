"""TXT records and admission reports: encode, parse, and refuse garbage."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshcloud.core.errors import InvalidInput
from meshcloud.core.formation import FormationStatus, Member
from meshcloud.discovery.records import (
    Announcement,
    RackReport,
    parse_txt,
    report_from_dict,
    report_from_json,
    report_to_json,
    txt_properties,
)

CID = "0123456789abcdef0123456789abcdef"
UUID = "0f8e6a3c-1d2b-4c5d-8e9f-a0b1c2d3e4f5"


def announcement(**overrides: Any) -> Announcement:
    fields: dict[str, Any] = {
        "cluster_id": CID,
        "rack": "rack-a",
        "site": "north",
        "raft_port": 7440,
        "api_port": 8440,
        "version": "0.1.0",
    }
    return Announcement(**(fields | overrides))


def as_wire(props: dict[str, str]) -> dict[bytes, bytes | None]:
    return {k.encode(): v.encode() for k, v in props.items()}


def test_txt_round_trip() -> None:
    for ann in (announcement(), announcement(formed=True, cluster_uuid=UUID)):
        assert parse_txt(as_wire(txt_properties(ann))) == ann
        assert parse_txt(txt_properties(ann)) == ann


def test_instance_name_is_unique_per_cluster() -> None:
    assert announcement().instance_name() == "rack-a-01234567._meshcloud._tcp.local."
    assert announcement().host_name() == "rack-a-01234567.local."


GOOD = as_wire(txt_properties(announcement()))

HOSTILE_TXT: list[tuple[str, dict[Any, Any], str]] = [
    ("no rack", {k: v for k, v in GOOD.items() if k != b"rack"}, "no 'rack' value"),
    ("path in name", GOOD | {b"rack": b"../../etc/passwd"}, "rack name"),
    ("quote in site", GOOD | {b"site": b"x' or 1=1"}, "site name"),
    ("look-alike", GOOD | {b"rack": "r\u0430ck".encode()}, "not ASCII"),
    ("control chars", GOOD | {b"rack": b"rack\x1b[31m"}, "control characters"),
    ("port too big", GOOD | {b"api": b"99999"}, "between 1 and 65535"),
    ("port zero", GOOD | {b"raft": b"0"}, "between 1 and 65535"),
    ("port negative", GOOD | {b"raft": b"-1"}, "not a port number"),
    ("port words", GOOD | {b"api": b"http"}, "not a port number"),
    ("port huge digits", GOOD | {b"api": b"9" * 200}, "not a port number"),
    ("binary", GOOD | {b"ver": b"\xff\xfe"}, "not ASCII"),
    ("no value", GOOD | {b"cid": None}, "no 'cid' value"),
    ("bad cluster id", GOOD | {b"cid": b"zz"}, "32 hex digits"),
    ("protocol 2", GOOD | {b"v": b"2"}, "protocol version"),
    ("formed maybe", GOOD | {b"formed": b"maybe"}, "must be 0 or 1"),
    ("formed without uuid", GOOD | {b"formed": b"1"}, "formed rack announces"),
    ("bad uuid", GOOD | {b"formed": b"1", b"cuuid": b"<uuid>"}, "not a lowercase UUID"),
    ("version with space", GOOD | {b"ver": b"1 0"}, "version"),
    ("huge value", GOOD | {b"site": b"a" * 300}, "bytes long"),
]


@pytest.mark.parametrize(
    ("props", "text"), [c[1:] for c in HOSTILE_TXT], ids=[c[0] for c in HOSTILE_TXT]
)
def test_hostile_txt_is_refused(props: dict[Any, Any], text: str) -> None:
    with pytest.raises(InvalidInput, match=text):
        parse_txt(props)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([b"v", b"cid", b"rack", b"site", b"raft", b"api", b"ver", b"formed", b"x"]),
        st.one_of(st.none(), st.binary(max_size=300)),
    )
)
def test_any_txt_either_parses_or_raises_invalid_input(props: dict[bytes, bytes | None]) -> None:
    with contextlib.suppress(InvalidInput):
        parse_txt(GOOD | props)


def rack_report(**overrides: Any) -> RackReport:
    fields: dict[str, Any] = {
        "name": "rack-a",
        "site": "north",
        "address": "10.0.0.1",
        "api_port": 8440,
        "raft_port": 7440,
        "version": "0.1.0",
        "bootstrap_expect": 3,
        "candidates": frozenset({"rack-a", "rack-b"}),
    }
    return RackReport(**(fields | overrides))


def test_report_round_trip() -> None:
    formed = FormationStatus(
        formed=True,
        cluster_uuid=UUID,
        leader="rack-b",
        members=(Member("rack-b", "10.0.0.2", 7440, 8440),),
    )
    known = (Member("rack-b", "10.0.0.2", 7440, 8440), Member("rack-c", "fd00::3", 7440, 8440))
    founding = FormationStatus(
        formed=True,
        cluster_uuid=UUID,
        leader="rack-a",
        members=(Member("rack-a", "10.0.0.1", 7440, 8440),),
        founding=(
            Member("rack-a", "10.0.0.1", 7440, 8440),
            Member("rack-b", "10.0.0.2", 7440, 8440),
        ),
    )
    for report in (
        rack_report(),
        rack_report(status=formed, known=known),
        rack_report(status=founding),
    ):
        assert report_from_json(report_to_json(report)) == report


def test_a_report_without_founding_voters_still_parses() -> None:
    """Racks of an earlier version do not send ``founding``: their reports stay valid."""
    data = json.loads(report_to_json(rack_report()))
    del data["founding"]
    assert report_from_json(json.dumps(data)) == rack_report()


def test_report_json_is_canonical() -> None:
    text = report_to_json(rack_report())
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))


BASE = rack_report().to_dict()

HOSTILE_REPORTS: list[tuple[str, Any, str]] = [
    ("not an object", [1, 2], "must be a JSON object"),
    ("unknown field", BASE | {"shell": "rm -rf /"}, "unknown field"),
    ("missing field", {k: v for k, v in BASE.items() if k != "site"}, "missing field"),
    ("bad name", BASE | {"name": "a/b"}, "rack name"),
    ("port as text", BASE | {"api_port": "8440"}, "between 1 and 65535"),
    ("port as bool", BASE | {"raft_port": True}, "between 1 and 65535"),
    ("address", BASE | {"address": "evil.example"}, "not an IP address"),
    ("expect 0", BASE | {"bootstrap_expect": 0}, "between 1 and 64"),
    ("formed as text", BASE | {"formed": "yes"}, "true or false"),
    ("uuid unformed", BASE | {"cluster_uuid": UUID}, "unformed rack has no"),
    ("candidates not list", BASE | {"candidates": "rack-a"}, "candidates must be a list"),
    ("bad candidate", BASE | {"candidates": ["rack-a", "<x>"]}, "candidate rack name"),
    ("too many candidates", BASE | {"candidates": [f"r{i}" for i in range(300)]}, "at most 256"),
    ("self not candidate", BASE | {"candidates": ["rack-b"]}, "include itself"),
    ("known not a list", BASE | {"known": {"a": 1}}, "known must be a list"),
    (
        "known entry",
        BASE | {"known": [{"name": "rack-b", "address": "x", "raft_port": 1, "api_port": 2}]},
        "not an IP address",
    ),
    (
        "member field",
        BASE | {"formed": True, "cluster_uuid": UUID, "members": [{"name": "x"}]},
        "missing field",
    ),
]


@pytest.mark.parametrize(
    ("data", "text"), [c[1:] for c in HOSTILE_REPORTS], ids=[c[0] for c in HOSTILE_REPORTS]
)
def test_hostile_report_is_refused(data: Any, text: str) -> None:
    with pytest.raises(InvalidInput, match=text):
        report_from_dict(data)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "bytes; the limit"),
        ("[" * 20_000 + "]" * 20_000, "not valid JSON|must be a JSON object"),
        ("null", "must be a JSON object"),
    ],
)
def test_report_text_problems(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        report_from_json(text)
