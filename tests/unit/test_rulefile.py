"""The rule file: what it may say, and the file and line of every mistake in it."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from gateway.config import ConfigError
from gateway.filters._rulefile import load_rules, parse_rules

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "etc", "rules.example.toml")


def parse(text: str, base: str = "/") -> object:
    return parse_rules(textwrap.dedent(text), "rules.toml", base)


def error(text: str, base: str = "/") -> str:
    with pytest.raises(ConfigError) as raised:
        parse(text, base)
    return str(raised.value)


RULE = """
[[rule]]
name = "r"
direction = "inbound"
action = "reject"
  [[rule.if]]
  field = "subject"
  contains = "x"
"""


def test_the_example_rule_file_loads() -> None:
    ruleset = load_rules(EXAMPLE)
    names = [rule.name for rule in ruleset.rules]
    assert names[0] == "no programs"
    assert "helpdesk autoreply" in names
    assert [r.name for r in ruleset.for_direction("outbound")] == ["big outgoing files", "legal archive"]


def test_a_rule_with_its_conditions_and_actions() -> None:
    ruleset = parse(
        """
        [[rule]]
        name = "tag it"
        direction = "both"
        match = "any"
        action = ["tag", "notify", "copy-to"]
        header = ["X-A: 1", "X-B: two words"]
        subject_prefix = "[EXT] "
        notify = "admin@example.com"
        copy_to = "copy@example.com"
          [[rule.if]]
          field = "header:X-Mailer"
          regex = 'bulk\\s+mailer'
          [[rule.if]]
          field = "size"
          below = "1K"
          not = true
        """
    )
    [rule] = ruleset.rules  # type: ignore[attr-defined]
    assert rule.directions == frozenset({"inbound", "outbound"})
    assert not rule.match_all
    assert rule.headers == (("X-A", "1"), ("X-B", "two words"))
    assert rule.notify == "admin@example.com"
    assert rule.final is None
    header, size = rule.conditions
    assert (header.field, header.header, header.operator) == ("header", "X-Mailer", "regex")
    assert header.matches(["Bulk   Mailer 2.0"])  # case ignored by default
    assert (size.operator, size.number, size.negate) == ("below", 1024, True)
    assert size.matches(2000) and not size.matches(10)


def test_in_file_reads_a_list_relative_to_the_rule_file(tmp_path: Path) -> None:
    (tmp_path / "vip.txt").write_text("# VIPs\nBoss@Example.com\n\n  ceo@example.com  \n")
    rules = tmp_path / "rules.toml"
    rules.write_text(RULE.replace('contains = "x"', 'in_file = "vip.txt"').replace('"subject"', '"sender"'))
    ruleset = load_rules(str(rules))
    [condition] = ruleset.rules[0].conditions
    assert condition.values == frozenset({"boss@example.com", "ceo@example.com"})
    assert ruleset.files == (str(rules), str(tmp_path / "vip.txt"))


@pytest.mark.parametrize(
    "change,line,problem",
    [
        (('direction = "inbound"', 'direction = "sideways"'), 4, "rule[0].direction: must be one of"),
        (('direction = "inbound"\n', ""), 2, "rule[0].direction: is required"),
        (('action = "reject"', 'action = "explode"'), 5, "unknown action 'explode'"),
        (('action = "reject"', 'action = ["reject", "discard"]'), 5, "at most one of"),
        (('field = "subject"', 'field = "colour"'), 7, "rule[0].if[0].field: must be one of"),
        (('field = "subject"', 'field = "header:Bad Name"'), 7, "is not a header name"),
        (('contains = "x"', "regex = '(unclosed'"), 8, "bad regular expression"),
        (('contains = "x"', "regex = '(a+)+$'"), 8, "nested quantifier"),
        (('contains = "x"', 'above = "10M"'), 8, "above is for the size field"),
        (('contains = "x"', 'contains = "x"\n  equals = "y"'), 8, "needs one operator"),
        (('contains = "x"', 'contains = ""'), 8, "must not be empty"),
        (('contains = "x"', 'contains = "x"\n  colour = "red"'), 9, "rule[0].if[0].colour: unknown key"),
        (
            ('name = "r"', 'name = "r"\nshape = "round"'),
            4,
            "rule[0].shape: unknown key (see etc/rules.example",
        ),
        (('action = "reject"', 'action = "redirect"'), 2, "redirect_to: is required by the redirect action"),
        (
            ('action = "reject"', 'action = "reject"\nredirect_to = "not an address"'),
            6,
            "is not a mail address",
        ),
        (('action = "reject"', 'action = "tag"'), 5, "tag needs a header or a subject_prefix"),
        (('action = "reject"', 'action = "tag"\nheader = "no colon"'), 6, "is not a header line"),
        (
            ('action = "reject"', 'action = "auto-reply"\nreply_text = "hi"\nreply_period = "soon"'),
            7,
            "duration",
        ),
    ],
)
def test_each_mistake_names_the_file_line_and_key(change: tuple[str, str], line: int, problem: str) -> None:
    text = RULE.replace(*change)
    message = error(text)
    assert message.startswith(f"rules.toml, line {line}: "), message
    assert problem in message


def test_errors_in_a_later_rule_and_condition_point_at_their_own_lines() -> None:
    text = RULE + RULE.replace('name = "r"', 'name = "s"').replace(
        'contains = "x"', 'contains = "x"\n  [[rule.if]]\n  field = "body"\n  regex = "[z"'
    )
    assert error(text).startswith("rules.toml, line 19: rule[1].if[1].regex: bad regular expression")


def test_two_rules_of_one_name_are_refused() -> None:
    assert error(RULE + RULE).startswith("rules.toml, line 11: rule[1].name: another rule is named 'r'")


def test_toml_syntax_errors_have_their_line() -> None:
    assert error('[[rule]]\nname = "r\n').startswith("rules.toml, line 2: TOML syntax error")


def test_a_missing_list_file_or_rule_file_is_named(tmp_path: Path) -> None:
    text = RULE.replace('contains = "x"', 'in_file = "missing.txt"')
    assert "cannot read /missing.txt" in error(text)
    with pytest.raises(ConfigError, match="cannot read the rule file"):
        load_rules(str(tmp_path / "nothing.toml"))


def test_a_rule_without_conditions_is_refused() -> None:
    text = '[[rule]]\nname = "r"\ndirection = "both"\naction = "discard"\n'
    assert error(text) == "rules.toml, line 1: rule[0].if: a rule needs at least one condition ([[rule.if]])"
