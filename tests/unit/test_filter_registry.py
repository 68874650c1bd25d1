"""The registry: chains from the config, entry-point filters, and start-up errors naming file and line."""

from __future__ import annotations

from importlib.metadata import EntryPoint
from typing import Any

import pytest

from gateway import config as configuration
from gateway.filters import FilterServices, registry
from gateway.model import Action, Direction, Stage

THIRD_PARTY = EntryPoint("static", "gateway.filters.testing:StaticFilter", registry.ENTRY_POINT_GROUP)


@pytest.fixture(autouse=True)
def third_party(monkeypatch: pytest.MonkeyPatch) -> list[EntryPoint]:
    """One third-party filter, "static", registered through the entry-point group."""
    found = [THIRD_PARTY]

    def entry_points(group: str) -> list[EntryPoint]:
        assert group == registry.ENTRY_POINT_GROUP
        return found

    monkeypatch.setattr(registry, "entry_points", entry_points)
    return found


def build(text: str) -> Any:
    cfg = configuration.parse(text, "mailgate.toml", base_dir="/")
    return registry.build_runner(cfg, FilterServices(cfg, reactor=None))


def error_of(text: str) -> str:
    with pytest.raises(configuration.ConfigError) as raised:
        build(text)
    return str(raised.value)


def test_chains_keep_the_configured_order_and_instances_are_shared() -> None:
    runner = build(
        """
[filters]
inbound = ["early", "late"]
outbound = ["late"]
[filters.early]
filter = "static"
stages = ["connect", "helo"]
[filters.late]
filter = "static"
stages = ["rcpt"]
timeout = "2s"
on_failure = "continue"
"""
    )
    inbound = runner.chains[Direction.INBOUND]
    assert [link.name for link in inbound] == ["early", "late"]
    assert inbound[0].filter.stages == frozenset({Stage.CONNECT, Stage.HELO})
    assert inbound[1].timeout == 2.0 and inbound[1].on_failure.action is Action.CONTINUE
    assert inbound[0].on_failure.action is Action.DEFER  # the default: never fail open
    assert runner.chains[Direction.OUTBOUND][0].filter is inbound[1].filter
    assert runner.chains[Direction.FETCHED] == ()


def test_describe_prints_the_effective_chains() -> None:
    runner = build('[filters]\ninbound = ["static"]\n')
    lines = registry.describe(runner)
    assert lines[0] == "inbound:"
    assert lines[1].split()[:3] == ["1.", "static", "stages=connect"]
    assert "on_failure=defer" in lines[1]
    assert lines[2:] == ["outbound:", "  (empty)", "fetched:", "  (empty)"]


def test_an_unknown_filter_names_the_file_line_and_key() -> None:
    message = error_of('\n[filters]\ninbound = ["static", "no-such-filter"]\n')
    assert message.startswith("mailgate.toml, line 3: filters.inbound: unknown filter 'no-such-filter'")
    assert "static" in message  # the known names are listed


def test_a_filter_listed_twice_in_a_chain_is_an_error() -> None:
    message = error_of('[filters]\ninbound = ["static", "static"]\n')
    assert "line 2: filters.inbound: filter 'static' is listed twice" in message


def test_a_name_registered_twice_is_an_error(third_party: list[EntryPoint]) -> None:
    third_party.append(EntryPoint("lists", "somewhere:Else", registry.ENTRY_POINT_GROUP))
    message = error_of('[filters]\ninbound = ["static"]\n')
    assert "filter name 'lists' is registered twice" in message


def test_a_bad_option_names_the_filters_table_and_line() -> None:
    message = error_of('[filters]\ninbound = ["static"]\n[filters.static]\nstages = ["connect"]\nzones = 3\n')
    assert message == (
        "mailgate.toml, line 5: filters.static.zones: unknown key"
        " (see etc/mailgate.toml for the documented keys)"
    )


def test_options_of_an_unchained_filter_are_still_checked_and_a_typo_is_an_error() -> None:
    runner = build('[filters]\ninbound = []\n[filters.static]\nstages = ["rcpt"]\n')  # documented, unused
    assert runner.chains[Direction.INBOUND] == ()
    message = error_of('[filters]\ninbound = []\n[filters.static]\nstages = ["rcpt"]\nzones = 1\n')
    assert "filters.static.zones: unknown key" in message
    message = error_of('[filters]\ninbound = []\n[filters.dnsbll]\nzones = ["x"]\n')
    assert message.startswith(
        "mailgate.toml, line 3: filters.dnsbll: options for 'dnsbll', which is not a known"
    )


def test_a_bad_failure_action_is_an_error() -> None:
    message = error_of('[filters]\ninbound = ["static"]\n[filters.static]\non_failure = "pass"\n')
    assert "filters.static.on_failure: must be one of defer, reject, continue" in message


def test_every_builtin_name_points_at_a_module_and_class_named_after_it() -> None:
    for name, spec in registry.BUILTIN.items():
        module, _, cls = spec.partition(":")
        assert module == "gateway.filters." + name.replace("-", "_")
        # the config name's parts, capitalised (a brand keeps its own capitals: ClamAV)
        assert cls.lower() == name.replace("-", "") and cls[0].isupper()
