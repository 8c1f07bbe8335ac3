import struct

from meshcloud.lab import shaper


def _packet_message(packet_id: int) -> bytes:
    hdr = shaper.nlattr(shaper.NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x0800, 3))
    other = shaper.nlattr(5, struct.pack("!I", 2))  # an interface index before/after
    return shaper.nfq_message(shaper.NFQNL_MSG_PACKET, 0, other + hdr, seq=0)


def test_attributes_are_padded_to_four_bytes() -> None:
    attr = shaper.nlattr(1, b"abcde")
    assert len(attr) == 12
    assert struct.unpack_from("=HH", attr) == (9, 1)


def test_packet_ids_are_parsed_from_a_batch_of_messages() -> None:
    data = _packet_message(7) + _packet_message(8) + _packet_message(0xFFFFFFF0)
    assert list(shaper.parse_messages(data)) == [
        ("packet", 7),
        ("packet", 8),
        ("packet", 0xFFFFFFF0),
    ]


def test_errors_and_acks_are_reported() -> None:
    ack = struct.pack("=IHHII", 36, shaper.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", 0) + b"\0" * 16
    err = (
        struct.pack("=IHHII", 36, shaper.NLMSG_ERROR, 0, 2, 0) + struct.pack("=i", -1) + b"\0" * 16
    )
    assert list(shaper.parse_messages(ack + err)) == [("error", 0), ("error", 1)]


def test_truncated_input_is_ignored() -> None:
    data = _packet_message(3)
    assert list(shaper.parse_messages(data[:-4])) == []
    assert list(shaper.parse_messages(b"\x01\x00")) == []


def test_batch_verdict_accepts_up_to_an_id() -> None:
    msg = shaper.batch_accept_message(0, 42, seq=5)
    length, msg_type, flags, seq, _ = struct.unpack_from("=IHHII", msg)
    assert length == len(msg) and seq == 5
    assert msg_type == (shaper.NFNL_SUBSYS_QUEUE << 8) | shaper.NFQNL_MSG_VERDICT_BATCH
    assert flags & shaper.NLM_F_REQUEST
    verdict, packet_id = struct.unpack_from("!II", msg, 16 + 4 + 4)
    assert (verdict, packet_id) == (shaper.NF_ACCEPT, 42)


def test_bind_messages_ask_for_acks_and_metadata_only() -> None:
    bind, params, flags = shaper.bind_messages(3)
    for msg in (bind, params, flags):
        assert struct.unpack_from("=H", msg, 6)[0] & shaper.NLM_F_ACK
        assert struct.unpack_from("!H", msg, 18)[0] == 3  # res_id = the queue
    copy_range, mode = struct.unpack_from("!IB", params, 16 + 4 + 4)
    assert (copy_range, mode) == (0, shaper.NFQNL_COPY_META)
