"""The documented options of the DNS filters (etc/fragments/*.toml) are the keys they read, at
their defaults; and each fragment, with a zone where one is required, is a working config."""

from __future__ import annotations

import os
import tomllib
from typing import Any

import pytest
from twisted.internet.task import Clock

from gateway import config as configuration
from gateway.config import Section
from gateway.filters import FilterServices
from gateway.filters.dns import StaticDnsLookups
from gateway.filters.registry import BUILTIN, _load, build_runner
from gateway.model import Direction

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAMES = ["dnsbl", "rhsbl", "helo", "reverse-dns", "sender-domain"]
REQUIRED = {"dnsbl": {"zones": ["zen.test"]}, "rhsbl": {"zones": ["dbl.test"]}}


def fragment(name: str) -> tuple[str, dict[str, Any]]:
    with open(os.path.join(ROOT, "etc", "fragments", f"{name}.toml"), encoding="utf-8") as handle:
        text = handle.read()
    return text, tomllib.loads(text)["filters"][name]


def services() -> FilterServices:
    cfg = configuration.parse("", "mailgate.toml", base_dir="/")
    return FilterServices(cfg, Clock(), dns=StaticDnsLookups({}), anvil=object(), store=object())


def plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("name", NAMES)
def test_the_fragment_documents_every_key_at_its_default(name: str) -> None:
    text, documented = fragment(name)
    section = Section("fragment", text, REQUIRED.get(name, {}), f"filters.{name}")
    _load(BUILTIN[name]).from_config(section, services())
    section.done()
    read = {key: plain(default) for key, default in section.asked.items()}
    assert read == documented


@pytest.mark.parametrize("name", NAMES)
def test_the_fragment_is_a_working_config(name: str) -> None:
    text, _ = fragment(name)
    for key, value in REQUIRED.get(name, {}).items():
        text = text.replace(f"\n{key} = []\n", f"\n{key} = {value!r}\n".replace("'", '"'))
    cfg = configuration.parse(f'[filters]\ninbound = ["{name}"]\n{text}', "mailgate.toml", base_dir="/")
    runner = build_runner(
        cfg, FilterServices(cfg, Clock(), dns=StaticDnsLookups({}), anvil=object(), store=object())
    )
    assert [link.name for link in runner.chains[Direction.INBOUND]] == [name]


@pytest.mark.parametrize("name", ["dnsbl", "rhsbl"])
def test_zones_may_be_empty_only_where_no_chain_uses_the_filter(name: str) -> None:
    text = f"[filters.{name}]\nzones = []\n"
    cfg = configuration.parse(text, "mailgate.toml", base_dir="/")
    build_runner(cfg, FilterServices(cfg, Clock(), dns=StaticDnsLookups({}), anvil=object(), store=object()))
    used = configuration.parse(f'[filters]\noutbound = ["{name}"]\n{text}', "mailgate.toml", base_dir="/")
    with pytest.raises(configuration.ConfigError, match=f"line 4: filters.{name}.zones: no zones"):
        build_runner(
            used, FilterServices(used, Clock(), dns=StaticDnsLookups({}), anvil=object(), store=object())
        )
