"""Which filters exist, and the chains the config builds from them.

Built-in filters are in `BUILTIN`, one line each. Third-party filters come from
the ``mailgate.filters`` entry-point group (name = config name, value = a class
with ``from_config(options, services)``). A name used by both, an unknown name,
or a bad option is a start-up error naming the file, line and key.

A chain lists instance names. An instance's options are its ``[filters.<name>]``
table; ``filter = "<registered name>"`` there lets one filter be used twice
under two names (two DNSBL instances, say); ``timeout`` and ``on_failure``
override the chain-wide ones for this instance.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from importlib.metadata import entry_points
from typing import Any

from gateway.config import FAILURE_ACTIONS, Config, ConfigError
from gateway.filters import FilterServices
from gateway.filters.chain import ChainRunner, Link, check_filter, failure_verdict
from gateway.model import Direction

ENTRY_POINT_GROUP = "mailgate.filters"

# name -> "module:Class"; kept in the order an administrator would chain them
BUILTIN: dict[str, str] = {
    "lists": "gateway.filters.lists:Lists",
    "limits": "gateway.filters.limits:Limits",
    "protocol": "gateway.filters.protocol:Protocol",
    "helo": "gateway.filters.helo:Helo",
    "reverse-dns": "gateway.filters.reverse_dns:ReverseDns",
    "dnsbl": "gateway.filters.dnsbl:Dnsbl",
    "rhsbl": "gateway.filters.rhsbl:Rhsbl",
    "sender-domain": "gateway.filters.sender_domain:SenderDomain",
    "recipients": "gateway.filters.recipients:Recipients",
    "greylist": "gateway.filters.greylist:Greylist",
    "quota": "gateway.filters.quota:Quota",
    "auto-whitelist": "gateway.filters.auto_whitelist:AutoWhitelist",
    "attachments": "gateway.filters.attachments:Attachments",
    "bayes": "gateway.filters.bayes:Bayes",
    "clamav": "gateway.filters.clamav:ClamAV",
    "spamassassin": "gateway.filters.spamassassin:SpamAssassin",
    "rules": "gateway.filters.rules:Rules",
}


def available(source: str = "<config>") -> dict[str, str]:
    """Every registered filter name -> where it comes from ("module:Class")."""
    known = dict(BUILTIN)
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name in known:
            raise ConfigError(
                source,
                "filters",
                f"filter name {entry.name!r} is registered twice ({known[entry.name]} and {entry.value})",
            )
        known[entry.name] = entry.value
    return known


def _load(spec: str) -> Any:
    module, _, attribute = spec.partition(":")
    target: Any = importlib.import_module(module)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


def build_runner(
    cfg: Config, services: FilterServices, *, directions: Iterable[Direction] = Direction
) -> ChainRunner:
    """Build every filter instance the chains name, once, and the runner over them."""
    filters_cfg = cfg.filters
    known = available(cfg.source)
    instances: dict[str, Link] = {}
    chains: dict[Direction, tuple[Link, ...]] = {}
    for direction in directions:
        names: tuple[str, ...] = getattr(filters_cfg, direction.value)
        links = []
        for name in names:
            if name not in instances:
                instances[name] = _build(cfg, services, known, name, direction)
            links.append(instances[name])
        chains[direction] = tuple(links)
    for name in filters_cfg.options:
        if name in instances:
            continue
        section = filters_cfg.section(cfg.source, name)
        if section.table.get("filter", name) not in known:
            raise section.error("", f"options for {name!r}, which is not a known filter and no chain uses")
        _build(cfg, services, known, name, Direction.INBOUND)  # not in a chain: only checked
    return ChainRunner(chains, services.reactor)


def _build(
    cfg: Config, services: FilterServices, known: dict[str, str], name: str, direction: Direction
) -> Link:
    section = cfg.filters.section(cfg.source, name)
    kind = section.take("filter", str, name)
    timeout = section.duration("timeout", cfg.filters.timeout)
    on_failure = section.choice("on_failure", FAILURE_ACTIONS, cfg.filters.on_failure)
    if kind not in known:
        listed = ", ".join(sorted(known))
        problem = f"unknown filter {kind!r} (known: {listed})"
        if kind != name:
            raise section.error("filter", problem)
        raise ConfigError(cfg.source, f"filters.{direction.value}", problem, _line(cfg, direction))
    try:
        factory = _load(known[kind])
    except (ImportError, AttributeError) as error:
        raise ConfigError(cfg.source, f"filters.{name}", f"cannot load filter {kind!r}: {error}") from None
    instance = factory.from_config(section, services)
    section.done()
    if getattr(instance, "name", None) != name:
        instance.name = name  # the instance's name in logs, whatever its class calls itself
    check_filter(instance, name)
    return Link(instance, timeout, failure_verdict(on_failure, name))


def _line(cfg: Config, direction: Direction) -> int | None:
    from gateway.config import _find_line

    return _find_line(cfg.filters.text, "filters", direction.value)


def describe(runner: ChainRunner) -> list[str]:
    """The effective chains, in order, as `mailgatectl filters` prints them."""
    lines = []
    for direction in Direction:
        links = runner.chains.get(direction, ())
        lines.append(f"{direction.value}:")
        if not links:
            lines.append("  (empty)")
        for number, link in enumerate(links, 1):
            stages = ",".join(s.value for s in sorted(link.filter.stages, key=_stage_order))
            failure = link.on_failure.action.value
            lines.append(
                f"  {number:2}. {link.name:<16} stages={stages:<22} "
                f"timeout={link.timeout:g}s on_failure={failure}"
            )
    return lines


def _stage_order(stage: Any) -> int:
    from gateway.model import Stage

    return list(Stage).index(stage)
