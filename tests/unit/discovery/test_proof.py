"""The admission proof: key derivation, MACs and the server's side of the exchange."""

from __future__ import annotations

from typing import Any

import pytest

from meshcloud.core.errors import InvalidInput
from meshcloud.discovery import proof
from meshcloud.discovery.admission import (
    AdmissionServer,
    AdmittedPeer,
    HelloForbidden,
    HelloNameTaken,
)
from meshcloud.discovery.proof import ChallengeBook, ClusterKeys
from meshcloud.discovery.records import RackReport, report_to_json

SECRET = "correct horse battery staple, 32+ chars long"
OTHER = "another cluster's secret, also 32+ chars long"
KEYS = ClusterKeys.from_secret(SECRET)
WRONG = ClusterKeys.from_secret(OTHER)
# A stranger who learned the public cluster id (it is announced) but not the secret.
IMPOSTOR = ClusterKeys(cluster_id=KEYS.cluster_id, admission_key=WRONG.admission_key)


def rack_report(name: str, peers: tuple[str, ...] = ()) -> RackReport:
    return RackReport(
        name=name,
        site="north",
        address="10.0.0.1",
        api_port=8440,
        raft_port=7440,
        version="0.1.0",
        bootstrap_expect=3,
        candidates=frozenset({name, *peers}),
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Server:
    """rack-b's admission server, recording whom it admitted."""

    def __init__(self, keys: ClusterKeys = KEYS) -> None:
        self.admitted: list[AdmittedPeer] = []
        self.clock = Clock()
        self.view: set[str] = set()
        self.server = AdmissionServer(
            keys, "rack-b", self.report, self.on_admitted, challenge_ttl_s=10, clock=self.clock
        )

    def report(self) -> RackReport:
        return rack_report("rack-b", tuple(self.view))

    def on_admitted(self, peer: AdmittedPeer) -> None:
        self.admitted.append(peer)
        self.view.add(peer.name)

    def answer(self, doc: dict[str, Any]) -> dict[str, Any]:
        return self.server.answer(doc, "10.0.0.9")


def challenge(keys: ClusterKeys = KEYS, client: str = "rack-a", nonce: str | None = None) -> dict:
    nonce = nonce or proof.new_nonce()
    return {
        "protocol": 1,
        "step": "challenge",
        "cluster_id": keys.cluster_id,
        "client": client,
        "client_nonce": nonce,
        "mac": proof.challenge_mac(keys, client, nonce),
    }


def prove(first: dict, answer: dict, keys: ClusterKeys = KEYS, report: str | None = None) -> dict:
    client, client_nonce = first["client"], first["client_nonce"]
    server, server_nonce = answer["server"], answer["server_nonce"]
    text = report if report is not None else report_to_json(rack_report(client))
    return {
        "protocol": 1,
        "step": "prove",
        "cluster_id": keys.cluster_id,
        "client": client,
        "server": server,
        "client_nonce": client_nonce,
        "server_nonce": server_nonce,
        "report": text,
        "proof": proof.client_proof(keys, client, server, client_nonce, server_nonce, text),
    }


def test_cluster_id_is_stable_public_and_secret_dependent() -> None:
    assert ClusterKeys.from_secret(SECRET) == KEYS
    assert len(KEYS.cluster_id) == 32 and proof.is_hex(KEYS.cluster_id, 32)
    assert KEYS.cluster_id != WRONG.cluster_id
    assert KEYS.admission_key.hex() not in repr(KEYS)
    assert KEYS.cluster_id not in KEYS.admission_key.hex()


def test_transcript_is_unambiguous() -> None:
    assert proof.transcript("l", "ab", "c") != proof.transcript("l", "a", "bc")
    assert proof.transcript("l", "a", "") != proof.transcript("l", "a")


def test_macs_equal_refuses_non_strings_and_wrong_lengths() -> None:
    good = proof.mac(b"k", "label", "x")
    assert proof.macs_equal(good, good)
    assert not proof.macs_equal(good, good[:-1])
    assert not proof.macs_equal(good, None)
    assert not proof.macs_equal(good, 12)
    assert not proof.macs_equal(good, "é" * 64)


def test_labels_separate_message_kinds() -> None:
    fields = ("cid", "a", "b", "n1", "n2", "r")
    k = KEYS.admission_key
    macs = {
        proof.mac(k, label, *fields)
        for label in (
            proof.LABEL_CHALLENGE,
            proof.LABEL_SERVER,
            proof.LABEL_CLIENT,
            proof.LABEL_SERVER_REPORT,
        )
    }
    assert len(macs) == 4


def test_full_exchange_admits_both_sides() -> None:
    s = Server()
    first = challenge()
    answer = s.answer(first)
    assert answer["server"] == "rack-b"
    expected = proof.server_proof(
        KEYS, "rack-a", "rack-b", first["client_nonce"], answer["server_nonce"]
    )
    assert proof.macs_equal(expected, answer["proof"])
    final = s.answer(prove(first, answer))
    assert [p.name for p in s.admitted] == ["rack-a"]
    assert s.admitted[0].observed_address == "10.0.0.9"
    assert s.admitted[0].via == "inbound"
    mac = proof.server_report_mac(
        KEYS, "rack-a", "rack-b", first["client_nonce"], answer["server_nonce"], final["report"]
    )
    assert proof.macs_equal(mac, final["mac"])
    # the report was built after the client was admitted: it counts rack-a
    assert '"candidates":["rack-a","rack-b"]' in final["report"]


def test_wrong_secret_cannot_even_challenge() -> None:
    s = Server()
    with pytest.raises(HelloForbidden, match="another cluster"):
        s.answer(challenge(WRONG))
    with pytest.raises(HelloForbidden, match="does not prove the cluster secret"):
        s.answer(challenge(IMPOSTOR))
    assert s.admitted == []
    assert len(s.server.book) == 0


def test_impostor_cannot_prove_with_a_stolen_challenge() -> None:
    """A stranger replays a captured challenge: refused; a fresh one it cannot make."""
    s = Server()
    first = challenge()
    s.answer(first)
    with pytest.raises(HelloForbidden, match="replayed challenge"):
        s.answer(first)


def test_wrong_secret_proof_is_refused() -> None:
    s = Server()
    first = challenge()
    answer = s.answer(first)
    with pytest.raises(HelloForbidden, match="does not hold the cluster secret"):
        s.answer(prove(first, answer, keys=IMPOSTOR))
    assert s.admitted == []


def test_server_nonce_is_single_use() -> None:
    s = Server()
    first = challenge()
    answer = s.answer(first)
    message = prove(first, answer)
    s.answer(message)
    with pytest.raises(HelloForbidden, match="already used"):
        s.answer(message)
    assert len(s.admitted) == 1


def test_challenge_expires() -> None:
    s = Server()
    first = challenge()
    answer = s.answer(first)
    s.clock.now += 11
    with pytest.raises(HelloForbidden, match="expired"):
        s.answer(prove(first, answer))


@pytest.mark.parametrize(
    ("field", "value", "error", "text"),
    [
        ("report", None, HelloForbidden, "proof is wrong"),  # report changed after the MAC
        ("client", "rack-c", HelloForbidden, "does not match the challenge"),
        ("client_nonce", "0" * 64, HelloForbidden, "does not match the challenge"),
        ("server", "rack-x", HelloForbidden, "this is rack rack-b"),
        ("server_nonce", "f" * 64, HelloForbidden, "unknown, expired or already used"),
        ("proof", "0" * 64, HelloForbidden, "proof is wrong"),
        ("cluster_id", "0" * 32, HelloForbidden, "another cluster"),
        ("client", "../etc", InvalidInput, "client rack name"),
        ("client_nonce", "xyz", InvalidInput, "64 lowercase hex digits"),
        ("protocol", 2, InvalidInput, "protocol must be 1"),
        ("step", "launch", InvalidInput, "step must be"),
    ],
)
def test_tampered_fields_are_refused(field: str, value: object, error: type, text: str) -> None:
    s = Server()
    first = challenge()
    answer = s.answer(first)
    message = prove(first, answer)
    if field == "report":
        message["report"] = report_to_json(rack_report("rack-a", ("rack-z",)))
    else:
        message[field] = value
    with pytest.raises(error, match=text):
        s.answer(message)
    assert s.admitted == []


def test_proof_bound_to_the_rack_names() -> None:
    """A proof made for another pair of racks (same nonces) is refused."""
    s = Server()
    first = challenge()
    answer = s.answer(first)
    message = prove(first, answer)
    message["proof"] = proof.client_proof(
        KEYS,
        "rack-a",
        "rack-c",
        first["client_nonce"],
        answer["server_nonce"],
        message["report"],
    )
    with pytest.raises(HelloForbidden, match="proof is wrong"):
        s.answer(message)


def test_report_naming_another_rack_is_refused() -> None:
    s = Server()
    first = challenge()
    answer = s.answer(first)
    text = report_to_json(rack_report("rack-c"))
    with pytest.raises(InvalidInput, match="names rack rack-c"):
        s.answer(prove(first, answer, report=text))


def test_malformed_report_is_refused_after_authentication() -> None:
    s = Server()
    first = challenge()
    answer = s.answer(first)
    with pytest.raises(InvalidInput, match="not valid JSON"):
        s.answer(prove(first, answer, report="{not json"))


def test_a_client_with_our_own_name_is_refused() -> None:
    s = Server()
    with pytest.raises(HelloNameTaken, match="own name"):
        s.answer(challenge(client="rack-b"))


def test_missing_field_is_named() -> None:
    s = Server()
    doc = challenge()
    del doc["client_nonce"]
    with pytest.raises(InvalidInput, match="missing field 'client_nonce'"):
        s.answer(doc)


def test_challenge_book_is_bounded() -> None:
    book = ChallengeBook(ttl_s=10, max_entries=4)
    for i in range(10):
        book.issue("rack-a", f"{i:064x}", f"{i:064x}", now=0.0)
        assert len(book) <= 4
    assert book.take(f"{0:064x}", now=0.0) is None  # the oldest were dropped
    assert book.take(f"{9:064x}", now=0.0) is not None
    assert book.take(f"{9:064x}", now=0.0) is None  # single use


def test_challenge_book_forgets_client_nonces_after_ttl() -> None:
    book = ChallengeBook(ttl_s=10, max_entries=4)
    assert book.remember_client_nonce("n", now=0.0)
    assert not book.remember_client_nonce("n", now=5.0)
    assert book.remember_client_nonce("n", now=10.5)
