from pathlib import Path

import pytest

from meshcloud.config import MIN_SECRET_LEN, load_config, parse_config
from meshcloud.core.errors import ConfigError

GOOD_SECRET = "k" * MIN_SECRET_LEN


def minimal(**overrides: object) -> dict[str, object]:
    data: dict[str, object] = {"rack": {"name": "rack-1"}, "cluster": {"secret": GOOD_SECRET}}
    data.update(overrides)
    return data


def test_minimal_config_gets_safe_defaults() -> None:
    cfg = parse_config(minimal())
    assert cfg.rack.name == "rack-1"
    assert cfg.timers.lease_s > 3 * cfg.timers.renew_s
    assert cfg.libvirt_uri() == "qemu:///embed?root=/var/lib/meshcloud/libvirt"
    assert cfg.read_secret() == GOOD_SECRET


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"cluster": {"secret": GOOD_SECRET}}, "rack: is required"),
        (minimal(rack={"name": "Rack<1>"}), "rack.name: name 'Rack<1>' contains"),
        (minimal(rack={"name": "r1", "colour": "red"}), "rack.colour: unknown key"),
        (minimal(timers={"renew_s": 1.5, "lease_s": 3.0}),
         "timers: lease_s (3.0) must exceed 3 x renew_s (1.5)"),
        (minimal(timers={"raft_min_timeout_s": 0.6, "raft_max_timeout_s": 0.5}),
         "raft_max_timeout_s (0.5) must exceed raft_min_timeout_s (0.6)"),
        (minimal(timers={"renew_s": -1}), "timers.renew_s: Input should be greater than 0"),
        (minimal(network={"api_port": 7440, "raft_port": 7440}), "api_port and raft_port must differ"),
        (minimal(network={"bind_address": "mesh0"}), "network.bind_address: 'mesh0' is not an IP"),
        (minimal(network={"appliance_bridge": "../br"}), "network.appliance_bridge"),
        (minimal(cluster={"secret": GOOD_SECRET, "max_voters": 4}), "cluster.max_voters: must be 1, 3 or 5"),
        (minimal(cluster={"secret": GOOD_SECRET, "peers": ["host"]}), "must be host:port"),
        (minimal(cluster={"secret": GOOD_SECRET, "peers": ["example.org:80"]}),
         "host must be an IP address"),
        (minimal(state_dir="relative/dir"), "state_dir: must be an absolute path"),
        (minimal(hypervisor={"uri": "qemu+ssh://x/system"}), "hypervisor.uri: must be"),
        (["not", "a", "mapping"], "must be a mapping"),
    ],
)  # fmt: skip
def test_invalid_configs_name_the_key_and_rule(data: object, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert expected in str(info.value)


@pytest.mark.parametrize("secret", ["", "   ", "changeme", "secret", "short-secret"])
def test_daemon_refuses_empty_default_or_short_secrets(secret: str) -> None:
    cfg = parse_config(minimal(cluster={"secret": secret}))
    with pytest.raises(ConfigError, match="secret"):
        cfg.read_secret()


def test_missing_secret_is_refused_with_a_hint() -> None:
    cfg = parse_config({"rack": {"name": "rack-1"}})
    with pytest.raises(ConfigError, match="refuses to start without a cluster secret"):
        cfg.read_secret()


def test_secret_file_is_read(tmp_path: Path) -> None:
    secret_file = tmp_path / "cluster.secret"
    secret_file.write_text(GOOD_SECRET + "\n")
    cfg = parse_config({"rack": {"name": "rack-1"}, "cluster": {"secret_file": str(secret_file)}})
    assert cfg.read_secret() == GOOD_SECRET


def test_load_config_reports_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "daemon.yaml"
    path.write_text("rack: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_load_config_reports_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("console", "expected"),
    [
        ({"tls_ca": "/etc/meshcloud/tls/ca.crt"},
         "tls_ca set but tls_cert, tls_key not: set all three"),
        ({"tls_cert": "/c.crt", "tls_key": "/c.key"}, "tls_cert, tls_key set but tls_ca not"),
        ({"tls_cert": "/c.crt", "tls_ca": "/ca.crt"}, "tls_key not"),
        ({"tls_key": "/c.key"}, "tls_cert, tls_ca not"),
    ],
)  # fmt: skip
def test_tls_needs_cert_key_and_ca_together(console: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as info:
        parse_config(minimal(console=console))
    assert "console" in str(info.value) and "or none (plain HTTP)" in str(info.value)


def test_tls_is_off_by_default_and_on_with_all_three() -> None:
    assert not parse_config(minimal()).console.tls
    files = {"tls_cert": "/t/rack.crt", "tls_key": "/t/rack.key", "tls_ca": "/t/ca.crt"}
    cfg = parse_config(minimal(console=files))
    assert cfg.console.tls and cfg.console.tls_ca == Path("/t/ca.crt")
