"""What racks tell each other: the mDNS announcement (TXT) and the admission report (JSON).

Pure parsers and encoders. Everything that arrives from the network passes
through :func:`parse_txt` or :func:`report_from_json`, which validate every
field (names through :func:`meshcloud.core.names.validate_name`, ports as
integers in range, addresses as IP addresses) and raise InvalidInput with a
message naming the field; callers log and ignore such records.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from meshcloud.core.errors import InvalidInput
from meshcloud.core.formation import (
    MAX_BOOTSTRAP_EXPECT,
    MAX_CANDIDATES,
    MAX_MEMBERS,
    NOT_FORMED,
    FormationStatus,
    Member,
    PeerReport,
    validate_address,
    validate_cluster_uuid,
    validate_port,
)
from meshcloud.core.names import validate_name
from meshcloud.discovery.proof import CLUSTER_ID_HEX_LEN, PROTOCOL_VERSION, is_hex

SERVICE_TYPE = "_meshcloud._tcp.local."
MAX_REPORT_BYTES = 48 * 1024
MAX_TXT_VALUE_BYTES = 255
_VERSION_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+-]{0,31}$")


def validate_version(value: object) -> str:
    """A software version string: 1-32 of [0-9A-Za-z.+-], starting with a letter or digit."""
    if not isinstance(value, str) or not _VERSION_RE.match(value):
        raise InvalidInput(f"version {value!r:.60} must be 1-32 of [0-9A-Za-z.+-]")
    return value


def _int(what: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(f"{what} {value!r:.40} must be an integer between {low} and {high}")
    return value


# --- the mDNS announcement --------------------------------------------------------------


@dataclass(frozen=True)
class Announcement:
    """A rack's TXT record: a hint of where to knock, never proof of anything."""

    cluster_id: str
    rack: str
    site: str
    raft_port: int
    api_port: int
    version: str
    formed: bool = False
    cluster_uuid: str | None = None

    def __post_init__(self) -> None:
        if not is_hex(self.cluster_id, CLUSTER_ID_HEX_LEN):
            raise InvalidInput(f"cluster id {self.cluster_id!r:.60} must be 32 hex digits")
        validate_name("rack", self.rack)
        validate_name("site", self.site)
        validate_port("raft port", self.raft_port)
        validate_port("api port", self.api_port)
        validate_version(self.version)
        if self.cluster_uuid is not None:
            validate_cluster_uuid(self.cluster_uuid)
        if self.formed != (self.cluster_uuid is not None):
            raise InvalidInput("a formed rack announces its cluster uuid, an unformed one none")

    def instance_name(self) -> str:
        """The DNS-SD instance name: rack name plus a cluster id prefix (unique per cluster)."""
        return f"{self.rack}-{self.cluster_id[:8]}.{SERVICE_TYPE}"

    def host_name(self) -> str:
        return f"{self.rack}-{self.cluster_id[:8]}.local."


def txt_properties(ann: Announcement) -> dict[str, str]:
    """The TXT key/value pairs of an announcement."""
    props = {
        "v": str(PROTOCOL_VERSION),
        "cid": ann.cluster_id,
        "rack": ann.rack,
        "site": ann.site,
        "raft": str(ann.raft_port),
        "api": str(ann.api_port),
        "ver": ann.version,
        "formed": "1" if ann.formed else "0",
    }
    if ann.cluster_uuid is not None:
        props["cuuid"] = ann.cluster_uuid
    return props


def _txt_text(props: Mapping[Any, Any], key: str, required: bool = True) -> str | None:
    raw = props.get(key.encode(), props.get(key))
    if raw is None:
        if required:
            raise InvalidInput(f"TXT record has no {key!r} value")
        return None
    if isinstance(raw, str):
        raw = raw.encode()
    if not isinstance(raw, bytes):
        raise InvalidInput(f"TXT {key!r} is not text")
    if len(raw) > MAX_TXT_VALUE_BYTES:
        raise InvalidInput(f"TXT {key!r} is {len(raw)} bytes long")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidInput(f"TXT {key!r} is not ASCII") from None
    if not text.isprintable():
        raise InvalidInput(f"TXT {key!r} holds control characters")
    return text


def _txt_port(props: Mapping[Any, Any], key: str) -> int:
    text = _txt_text(props, key)
    assert text is not None
    if not text.isdigit() or len(text) > 5:
        raise InvalidInput(f"TXT {key!r} value {text!r:.40} is not a port number")
    return validate_port(f"TXT {key!r}", int(text))


def parse_txt(props: Mapping[Any, Any]) -> Announcement:
    """Validate a TXT record (bytes or str keys and values) into an Announcement."""
    version = _txt_text(props, "v")
    if version != str(PROTOCOL_VERSION):
        raise InvalidInput(f"TXT protocol version {version!r:.20} is not {PROTOCOL_VERSION}")
    formed = _txt_text(props, "formed")
    if formed not in ("0", "1"):
        raise InvalidInput(f"TXT 'formed' must be 0 or 1, not {formed!r:.20}")
    return Announcement(
        cluster_id=_txt_text(props, "cid") or "",
        rack=_txt_text(props, "rack") or "",
        site=_txt_text(props, "site") or "",
        raft_port=_txt_port(props, "raft"),
        api_port=_txt_port(props, "api"),
        version=_txt_text(props, "ver") or "",
        formed=formed == "1",
        cluster_uuid=_txt_text(props, "cuuid", required=False),
    )


# --- the admission report ---------------------------------------------------------------


@dataclass(frozen=True)
class RackReport:
    """What a rack says about itself during admission; authenticated by the proof's MAC.

    ``known`` lists where the racks it has admitted can be reached, so that
    one static peer (or one mDNS answer) is enough to find all the others.
    """

    name: str
    site: str
    address: str
    api_port: int
    raft_port: int
    version: str
    bootstrap_expect: int
    status: FormationStatus = NOT_FORMED
    candidates: frozenset[str] = frozenset()
    known: tuple[Member, ...] = ()

    def __post_init__(self) -> None:
        validate_name("rack", self.name)
        validate_name("site", self.site)
        validate_address(f"rack {self.name}: address", self.address)
        validate_port(f"rack {self.name}: api_port", self.api_port)
        validate_port(f"rack {self.name}: raft_port", self.raft_port)
        validate_version(self.version)
        self.formation_report()  # validates bootstrap_expect, status and candidates
        if not isinstance(self.known, tuple) or not all(isinstance(m, Member) for m in self.known):
            raise InvalidInput(f"rack {self.name}: known must be a tuple of Member")
        if len(self.known) > MAX_MEMBERS:
            raise InvalidInput(f"rack {self.name}: at most {MAX_MEMBERS} known racks")

    def formation_report(self) -> PeerReport:
        """The part cluster formation decides on."""
        return PeerReport(
            name=self.name,
            bootstrap_expect=self.bootstrap_expect,
            status=self.status,
            candidates=self.candidates,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "site": self.site,
            "address": self.address,
            "api_port": self.api_port,
            "raft_port": self.raft_port,
            "version": self.version,
            "bootstrap_expect": self.bootstrap_expect,
            "formed": self.status.formed,
            "cluster_uuid": self.status.cluster_uuid,
            "leader": self.status.leader,
            "members": [_member_dict(m) for m in self.status.members],
            "founding": [_member_dict(m) for m in self.status.founding],
            "candidates": sorted(self.candidates),
            "known": [_member_dict(m) for m in self.known],
        }


def _member_dict(m: Member) -> dict[str, Any]:
    return {"name": m.name, "address": m.address, "raft_port": m.raft_port, "api_port": m.api_port}


REPORT_KEYS = frozenset(
    {
        "name",
        "site",
        "address",
        "api_port",
        "raft_port",
        "version",
        "bootstrap_expect",
        "formed",
        "cluster_uuid",
        "leader",
        "members",
        "candidates",
        "known",
    }
)
MEMBER_KEYS = frozenset({"name", "address", "raft_port", "api_port"})
# Fields a report may leave out (racks of an older version did not send them).
OPTIONAL_REPORT_KEYS = frozenset({"founding"})


def canonical_json(data: Any) -> str:
    """One canonical text for a JSON value: sorted keys, no spaces, ASCII only."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def report_to_json(report: RackReport) -> str:
    return canonical_json(report.to_dict())


def _object(
    what: str, data: object, keys: frozenset[str], optional: frozenset[str] = frozenset()
) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    unknown = sorted(str(k)[:40] for k in data if k not in keys | optional)
    if unknown:
        raise InvalidInput(f"{what}: unknown field(s) {', '.join(unknown)}")
    missing = sorted(keys - set(data))
    if missing:
        raise InvalidInput(f"{what}: missing field(s) {', '.join(missing)}")
    return data


def _members(key: str, raw: object) -> list[Member]:
    if not isinstance(raw, list) or len(raw) > MAX_MEMBERS:
        raise InvalidInput(f"report: {key} must be a list of at most {MAX_MEMBERS}")
    out = []
    for item in raw:
        m = _object(f"report {key} entry", item, MEMBER_KEYS)
        out.append(Member(m["name"], m["address"], m["raft_port"], m["api_port"]))
    return out


def report_from_dict(data: object) -> RackReport:
    """Validate a decoded report; raises InvalidInput naming the broken field."""
    doc = _object("report", data, REPORT_KEYS, OPTIONAL_REPORT_KEYS)
    members = _members("members", doc["members"])
    founding = _members("founding", doc.get("founding", []))
    known = _members("known", doc["known"])
    candidates_raw = doc["candidates"]
    if not isinstance(candidates_raw, list) or len(candidates_raw) > MAX_CANDIDATES:
        raise InvalidInput(f"report: candidates must be a list of at most {MAX_CANDIDATES}")
    for candidate in candidates_raw:
        validate_name("candidate rack", candidate)
    if doc["formed"] is not True and doc["formed"] is not False:
        raise InvalidInput("report: formed must be true or false")
    status = FormationStatus(
        formed=doc["formed"],
        cluster_uuid=doc["cluster_uuid"],
        leader=doc["leader"],
        members=tuple(members),
        founding=tuple(founding),
    )
    return RackReport(
        name=doc["name"],
        site=doc["site"],
        address=doc["address"],
        api_port=doc["api_port"],
        raft_port=doc["raft_port"],
        version=doc["version"],
        bootstrap_expect=_int(
            "report: bootstrap_expect", doc["bootstrap_expect"], 1, MAX_BOOTSTRAP_EXPECT
        ),
        status=status,
        candidates=frozenset(candidates_raw),
        known=tuple(known),
    )


def report_from_json(text: object) -> RackReport:
    """Parse and validate a report sent as JSON text (at most MAX_REPORT_BYTES)."""
    if not isinstance(text, str):
        raise InvalidInput("report must be a JSON text in a string")
    if len(text) > MAX_REPORT_BYTES:
        raise InvalidInput(f"report is {len(text)} bytes; the limit is {MAX_REPORT_BYTES}")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidInput("report is not valid JSON") from None
    return report_from_dict(data)
