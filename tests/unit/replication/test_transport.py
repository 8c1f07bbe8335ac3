import os
import subprocess
from pathlib import Path

import pytest

from meshcloud.core.errors import InvalidInput
from meshcloud.replication.transport import (
    CHECKSUM_CHOICE,
    RsyncSettings,
    SshTarget,
    authorized_keys_line,
    parse_progress2,
    parse_rsync_output,
    remote_disk_dir,
    rsync_push_argv,
    rsyncd_conf_text,
    ssh_argv,
    ssh_options,
)
from meshcloud.replication.volume import checksum_like, file_checksum

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyFakeKeyFakeKeyFakeKeyFakeKey0 meshcloud-replication"


def target(**kw) -> SshTarget:
    base = dict(
        host="10.1.0.2",
        identity_file=Path("/etc/meshcloud/kit/replication_ed25519"),
        known_hosts_file=Path("/etc/meshcloud/kit/known_hosts"),
        port=2222,
        control_dir=Path("/run/meshcloud/ssh"),
    )
    base.update(kw)
    return SshTarget(**base)


def _opts(argv: list[str]) -> dict[str, str]:
    return dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "-o")


def test_ssh_options_pin_host_keys_and_forward_nothing() -> None:
    opts = _opts(ssh_options(target()))
    assert opts["BatchMode"] == "yes"
    assert opts["StrictHostKeyChecking"] == "yes"
    assert opts["UserKnownHostsFile"] == "/etc/meshcloud/kit/known_hosts"
    assert opts["GlobalKnownHostsFile"] == "/dev/null"
    assert opts["ForwardAgent"] == "no" and opts["IdentityAgent"] == "none"
    assert opts["ClearAllForwardings"] == "yes" and opts["IdentitiesOnly"] == "yes"
    assert opts["ControlPath"] == "/run/meshcloud/ssh/v-%C"


def test_rsync_goes_to_the_daemon_module_over_the_shared_master() -> None:
    argv = rsync_push_argv(target(), Path("/v/f"), "app/data", RsyncSettings())
    assert argv[-1] == "root@10.1.0.2::incoming/app/data/"
    rsh = argv[argv.index("-e") + 1].split()
    assert rsh[rsh.index("-i") + 1] == "/etc/meshcloud/kit/replication_ed25519"
    assert "ControlPath=/run/meshcloud/ssh/v-%C" in rsh


def test_rsync_push_never_inplace_and_resumable() -> None:
    argv = rsync_push_argv(
        target(), Path("/v/app/data/outbox/g000000000003.qcow2"), "app/data",
        RsyncSettings(bwlimit_kbps=2500, compress=True),
    )  # fmt: skip
    assert argv[0] == "rsync"
    assert "--inplace" not in argv and "--whole-file" not in argv
    assert "--partial" in argv
    assert "--checksum-choice=xxh128" in argv
    assert "--bwlimit=2500" in argv and "--compress" in argv
    assert argv[-1] == "root@10.1.0.2::incoming/app/data/"
    assert argv[-2] == "/v/app/data/outbox/g000000000003.qcow2"
    rsh = argv[argv.index("-e") + 1]
    assert rsh.startswith("ssh ") and "replication_ed25519" in rsh


def test_rsync_push_without_compression_or_limit() -> None:
    argv = rsync_push_argv(target(), Path("/v/f"), "a/b", RsyncSettings(compress=False))
    assert "--compress" not in argv and not any(a.startswith("--bwlimit") for a in argv)


def test_seed_push_is_sparse_with_progress() -> None:
    argv = rsync_push_argv(
        target(), Path("/v/seed.qcow2"), "a/b", RsyncSettings(), sparse=True, progress=True
    )
    assert "--sparse" in argv and "--info=progress2" in argv


def test_several_files_go_in_one_run() -> None:
    files = [Path(f"/v/app/data/outbox/g00000000000{g}.qcow2") for g in (3, 4, 5)]
    argv = rsync_push_argv(target(), files, "app/data", RsyncSettings())
    assert argv[-4:-1] == [str(f) for f in files]
    assert argv[-1] == "root@10.1.0.2::incoming/app/data/"
    with pytest.raises(InvalidInput):
        rsync_push_argv(target(), [], "app/data", RsyncSettings())
    with pytest.raises(InvalidInput):
        rsync_push_argv(target(), [files[0], Path("/v/a b")], "app/data", RsyncSettings())


@pytest.mark.parametrize("bad", ["../x", "/abs", "a/../b", "-rf", "a b", "a;b"])
def test_remote_paths_are_checked(bad: str) -> None:
    with pytest.raises(InvalidInput):
        rsync_push_argv(target(), Path("/v/f"), bad, RsyncSettings())


@pytest.mark.parametrize(
    "kw",
    [
        {"host": "-oProxyCommand=x"},
        {"host": "a b"},
        {"identity_file": Path("relative/key")},
        {"known_hosts_file": Path("/tmp/with space")},
        {"port": 0},
        {"user": "Root;"},
    ],
)
def test_bad_targets_are_refused(kw) -> None:
    with pytest.raises(InvalidInput):
        target(**kw)


def test_ssh_argv_passes_only_plain_words() -> None:
    argv = ssh_argv(target(), ["meshcloud-replica", "status", "voip"])
    assert argv[-4:] == ["--", "meshcloud-replica", "status", "voip"]
    with pytest.raises(InvalidInput):
        ssh_argv(target(), ["meshcloud-replica", "status", "$(reboot)"])


def test_authorized_keys_line_dispatches_rsync_and_verbs_literally() -> None:
    line = authorized_keys_line(
        KEY,
        Path("/opt/meshcloud/bin/python"),
        Path("/var/lib/meshcloud/volumes"),
        Path("/var/lib/meshcloud/ssh/rsyncd.conf"),
        from_addresses=["10.1.0.0/24"],
    )
    command = line.split('command="', 1)[1].split('"', 1)[0]
    assert command == (
        "case $SSH_ORIGINAL_COMMAND in 'rsync --server --daemon .')"
        " exec /usr/bin/rsync --server --daemon --config=/var/lib/meshcloud/ssh/rsyncd.conf . ;;"
        " *) exec /opt/meshcloud/bin/python -m meshcloud.replication.serve"
        " /var/lib/meshcloud/volumes ;; esac"
    )
    assert ",restrict," in line and 'from="10.1.0.0/24"' in line and line.endswith(KEY)
    with pytest.raises(InvalidInput):
        authorized_keys_line('ssh-ed25519 AAAA" evil', Path("/p"), Path("/v"), Path("/c"))
    with pytest.raises(InvalidInput):  # a path that would break out of the quoted command
        authorized_keys_line(KEY, Path("/p"), Path("/v"), Path("/c'; reboot; '"))


def test_rsyncd_conf_confines_the_module_to_incoming_write_only() -> None:
    text = rsyncd_conf_text(Path("/var/lib/meshcloud/volumes/.incoming"))
    module = text.split("[incoming]", 1)[1]
    settings = dict(
        (k.strip(), v.strip())
        for k, v in (line.split("=", 1) for line in module.splitlines() if "=" in line)
    )
    assert settings["path"] == "/var/lib/meshcloud/volumes/.incoming"
    assert settings["use chroot"] == "no" and settings["munge symlinks"] == "yes"
    assert settings["read only"] == "no" and settings["write only"] == "yes"
    assert settings["list"] == "no"
    assert {"delete*", "devices", "specials"} <= set(settings["refuse options"].split())
    assert text.count("[") == 1  # one module only
    with pytest.raises(InvalidInput):
        rsyncd_conf_text(Path("/v/.incoming\n[root]\npath = /"))


def test_remote_disk_dir_validates_names() -> None:
    assert remote_disk_dir("voip", "data") == "voip/data"
    with pytest.raises(InvalidInput):
        remote_disk_dir("voip", "../data")


RSYNC_OUTPUT = """mcfile|g000000000003.qcow2|52,428,800|1bce332ce1ee500ec346c397c1ffd891736aec78

Number of files: 1 (reg: 1)
Total file size: 52,428,800 bytes
Literal data: 52,428,800 bytes
Matched data: 0 bytes
Total bytes sent: 52,441,329
Total bytes received: 35

sent 52,441,329 bytes  received 35 bytes  666,909.33 bytes/sec
"""


def test_parse_rsync_output() -> None:
    r = parse_rsync_output(RSYNC_OUTPUT)
    assert r.files == {
        "g000000000003.qcow2": (52428800, "sha1:1bce332ce1ee500ec346c397c1ffd891736aec78")
    }
    xxh = parse_rsync_output("mcfile|g000000000004.qcow2|4,096|4A84DF93caaee1d424f07d94ed619f5f\n")
    assert xxh.files == {"g000000000004.qcow2": (4096, "xxh128:4a84df93caaee1d424f07d94ed619f5f")}
    assert parse_rsync_output("mcfile|g1.qcow2|4,096|\n").files == {"g1.qcow2": (4096, "")}
    assert (r.bytes_sent, r.bytes_received, r.literal_bytes, r.matched_bytes) == (
        52441329,
        35,
        52428800,
        0,
    )


def test_parse_rsync_output_without_checksum() -> None:
    r = parse_rsync_output("mcfile|f|10|\n")
    assert r.files == {"f": (10, "")} and r.bytes_sent == 0


def test_parse_progress2_takes_the_last_update() -> None:
    chunk = (
        "     1,048,576   2%   10.00MB/s    0:00:04\r    33,554,432  64%   32.00MB/s    0:00:01\r"
    )
    assert parse_progress2(chunk) == (33554432, 64)
    assert parse_progress2("nothing here") is None


def test_ssh_can_run_inside_a_rack_namespace() -> None:
    t = target(netns="mcl-lab-r1")
    assert ssh_argv(t, ["meshcloud-replica", "held"])[:5] == [
        "ip",
        "netns",
        "exec",
        "mcl-lab-r1",
        "ssh",
    ]
    argv = rsync_push_argv(t, Path("/v/f"), "a/b", RsyncSettings())
    assert argv[argv.index("-e") + 1].startswith("ip netns exec mcl-lab-r1 ssh ")
    with pytest.raises(InvalidInput):
        target(netns="../x")


def test_rsync_reports_the_checksum_the_receiver_computes(tmp_path: Path) -> None:
    """rsync's %C for the checksum choice in use equals volume.file_checksum (byte order too)."""
    src = tmp_path / "g000000000005.qcow2"
    src.write_bytes(os.urandom(3 << 20) + b"tail")
    (tmp_path / "out").mkdir()
    argv = [
        "rsync",
        f"--checksum-choice={CHECKSUM_CHOICE}",
        "--out-format=mcfile|%n|%l|%C",
        "--stats",
        str(src),
        f"{tmp_path / 'out'}/",
    ]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    reported = parse_rsync_output(done.stdout).files[src.name][1]
    assert reported.startswith(f"{CHECKSUM_CHOICE}:")
    assert reported == file_checksum(src) == file_checksum(tmp_path / "out" / src.name)
    assert checksum_like(src, "sha1:" + "0" * 40).startswith("sha1:")
    with pytest.raises(InvalidInput):
        file_checksum(src, "md5")
