"""The configuration: defaults, the documented example, and errors naming file, line and key."""

from __future__ import annotations

import os

import pytest

from gateway import config
from gateway.model import Role

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def error_of(text: str) -> config.ConfigError:
    with pytest.raises(config.ConfigError) as caught:
        config.parse(text, "test.toml", base_dir="/base")
    return caught.value


def test_embedded_defaults_listen_on_loopback_and_deliver_example_com_to_maildir() -> None:
    cfg = config.load(None)
    assert [(lst.endpoint, lst.role) for lst in cfg.smtp.listeners] == [
        ("tcp:2525:interface=127.0.0.1", Role.INBOUND)
    ]
    assert cfg.relay.domains == ("example.com",)
    assert cfg.routes[0].transport.startswith("maildir:")
    assert cfg.routes[0].transport.endswith("mailgate-state/mail/{domain}/{local}/")


def test_seed_defaults() -> None:
    cfg = config.parse("", "empty.toml")
    assert cfg.smtp.max_recipients == 16
    assert cfg.smtp.max_message_size == 100 * 1024 * 1024
    assert cfg.smtp.max_hops == 32
    assert cfg.smtp.idle_timeout == 300
    assert cfg.delivery.concurrency == 25
    assert cfg.delivery.retry_schedule == (480.0,)
    assert cfg.delivery.max_attempts == 16
    assert cfg.delivery.queue_scan_interval == 15
    assert cfg.gateway.hash_levels == 2


def test_documented_example_is_valid_and_sets_every_section() -> None:
    cfg = config.load(os.path.join(ROOT, "etc", "mailgate.toml"))
    assert cfg.gateway.hostname == "mailgate.example.com"
    assert [lst.role for lst in cfg.smtp.listeners] == [Role.INBOUND, Role.SUBMISSION]
    assert cfg.routes[0].transport == "smtp:[192.168.0.10]:25, smtp:[192.168.0.11]:25"
    assert cfg.smtp.max_message_size == 100 * 1024 * 1024


def test_every_default_in_the_code_is_documented_in_the_example() -> None:
    with open(os.path.join(ROOT, "etc", "mailgate.toml"), encoding="utf-8") as handle:
        text = handle.read()
    defaults = config.parse("", "<defaults>")
    for section in ("gateway", "smtp", "tls", "auth", "relay", "upstream", "delivery", "dns", "filters"):
        import attrs

        for field in attrs.fields(type(getattr(defaults, section))):
            if field.name in ("listeners", "options", "text"):
                continue
            assert f"\n{field.name} = " in text or f"\n# {field.name}" in text, (
                f"{section}.{field.name} is not documented in etc/mailgate.toml"
            )


def test_unknown_key_names_file_line_and_key() -> None:
    error = error_of('[gateway]\nhostname = "a"\n\n[smtp]\nmax_recipient = 5\n')
    assert str(error).startswith("test.toml, line 5: smtp.max_recipient: unknown key")


def test_wrong_type_names_file_line_and_key() -> None:
    error = error_of('[delivery]\nconcurrency = "many"\n')
    assert str(error) == "test.toml, line 2: delivery.concurrency: must be an integer, not a string"


def test_syntax_error_names_the_line() -> None:
    error = error_of("[smtp]\nmax_hops = = 3\n")
    assert error.line == 2
    assert "TOML syntax error" in str(error)


def test_bad_endpoint_is_reported_on_its_listener() -> None:
    text = '[[smtp.listeners]]\nendpoint = "tcp:25"\n\n[[smtp.listeners]]\nendpoint = "tcp:notaport"\n'
    error = error_of(text)
    assert error.key == "smtp.listeners[1].endpoint"
    assert error.line == 5


def test_bad_transport_is_reported_on_its_route() -> None:
    text = (
        '[[routes]]\nmatch = "*"\ntransport = "mx"\n'
        '[[routes]]\nmatch = "a.example"\ntransport = "carrier-pigeon"\n'
    )
    error = error_of(text)
    assert error.key == "routes[1].transport"
    assert error.line == 6
    assert "unknown transport" in str(error)


def test_bad_network_and_role_and_duration() -> None:
    assert "not an IP network" in str(error_of('[relay]\nnetworks = ["10.0.0.0/33"]\n'))
    assert "must be one of inbound, submission" in str(
        error_of('[[smtp.listeners]]\nendpoint = "tcp:25"\nrole = "outside"\n')
    )
    assert "duration" in str(error_of('[smtp]\nidle_timeout = "soon"\n'))
    assert "positive duration" in str(error_of("[delivery]\nretry_schedule = [0]\n"))


def test_durations_and_sizes_with_units() -> None:
    cfg = config.parse(
        '[smtp]\nidle_timeout = "5m"\nmax_message_size = "10M"\n[delivery]\n'
        'retry_schedule = ["5m", "1h", 30]\n',
        "t.toml",
    )
    assert cfg.smtp.idle_timeout == 300
    assert cfg.smtp.max_message_size == 10 * 1024 * 1024
    assert cfg.delivery.retry_schedule == (300.0, 3600.0, 30.0)


def test_relay_route_requires_upstream_host() -> None:
    error = error_of('[[routes]]\nmatch = "*"\ntransport = "relay"\n')
    assert error.key == "upstream.host"


def test_upstream_mode_requires_host() -> None:
    assert error_of('[upstream]\nmode = "always"\n').key == "upstream.host"


def test_unreadable_file_is_one_clear_message(tmp_path: object) -> None:
    with pytest.raises(config.ConfigError) as caught:
        config.load("/nonexistent/mailgate.toml")
    assert "cannot read the configuration" in str(caught.value)


def test_relative_paths_are_relative_to_the_file(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "m.toml")
    with open(path, "w") as handle:
        handle.write('[gateway]\nstate_dir = "state"\n')
    assert config.load(path).gateway.state_dir == os.path.join(tmp_path, "state")


def test_non_defaults_lists_only_what_was_changed() -> None:
    cfg = config.parse(
        '[gateway]\nhostname = "h.example"\nstate_dir = "/var/lib/mailgate"\n[smtp]\nmax_recipients = 50\n',
        "t.toml",
    )
    keys = dict(config.non_defaults(cfg))
    assert keys["smtp.max_recipients"] == 50
    assert "smtp.max_hops" not in keys
    assert "gateway.state_dir" not in keys


@pytest.mark.parametrize(
    ("domain", "patterns", "expected"),
    [
        ("example.com", ("example.com",), True),
        ("EXAMPLE.com.", ("example.com",), True),
        ("sub.example.com", ("example.com",), False),
        ("sub.example.com", ("*.example.com",), True),
        ("badexample.com", ("*.example.com",), False),
        ("anything.test", ("*",), True),
    ],
)
def test_domain_matches(domain: str, patterns: tuple[str, ...], expected: bool) -> None:
    assert config.domain_matches(domain, patterns) is expected


# where etc/mailgate.toml shows a value other than the default, on purpose
EXAMPLE_VALUES = {("dnsbl", "zones"), ("rhsbl", "zones")}


def test_every_option_of_every_builtin_filter_is_documented_at_its_default() -> None:
    from twisted.internet.task import Clock

    from gateway.filters import FilterServices
    from gateway.filters.registry import BUILTIN, _load

    cfg = config.load(os.path.join(ROOT, "etc", "mailgate.toml"))
    bare = config.parse("", "<defaults>", base_dir=os.path.join(ROOT, "etc"))
    for name, spec in BUILTIN.items():
        documented = cfg.filters.options.get(name)
        assert documented is not None, f"[filters.{name}] is missing from etc/mailgate.toml"
        example = cfg.filters.section(cfg.source, name)
        _load(spec).from_config(example, FilterServices(cfg, reactor=Clock()))
        missing = sorted(set(example.read) - set(documented))
        assert not missing, f"filters.{name}: {missing} not documented in etc/mailgate.toml"
        extra = sorted(set(documented) - set(example.read))
        assert not extra, f"filters.{name}: {extra} documented but never read"
        default = config.Section("<defaults>", "", {}, f"filters.{name}")
        _load(spec).from_config(default, FilterServices(bare, reactor=Clock()))
        for key, value in default.read.items():
            if (name, key) not in EXAMPLE_VALUES:
                assert example.read[key] == value, (
                    f"filters.{name}.{key}: documented {example.read[key]!r}, default {value!r}"
                )


def test_filter_chain_keys_and_defaults() -> None:
    cfg = config.parse('[filters]\ninbound = ["lists"]\ntimeout = "5s"\n', "t.toml")
    assert (cfg.filters.inbound, cfg.filters.timeout, cfg.filters.on_failure) == (("lists",), 5.0, "defer")
    assert str(error_of('[filters]\non_failure = "pass"\n')).startswith(
        "test.toml, line 2: filters.on_failure:"
    )
