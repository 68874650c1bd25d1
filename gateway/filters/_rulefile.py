"""The administrator's rule file for the "rules" filter: TOML in, checked rules out.

A rule file holds ``[[rule]]`` tables, in the order they are tried, each with
its conditions as ``[[rule.if]]`` tables (see etc/rules.example.toml)::

    [[rule]]
    name = "no programs from outside"
    direction = "inbound"        # inbound | outbound | both
    match = "any"                # all (the default) | any
    action = "reject"            # or a list: ["quarantine", "notify"]
    message = "Programs are not accepted here"

      [[rule.if]]
      field = "attachment"       # sender recipient subject body size attachment header:<Name>
      regex = '\\.(exe|scr)$'    # or equals / contains / in / in_file / above / below
      # not = true               # the condition holds when the test does not
      # case_sensitive = true    # comparisons ignore case unless this is set

Every problem is a `ConfigError` naming the file, the line and the key: at
start-up it stops the gateway, at a reload the old rules are kept. Regexes are
compiled here, once; a pattern with a nested quantifier (``(a+)+``), which can
take exponential time in Python's `re` (it has no timeout), is refused.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from gateway.config import ConfigError, Section, load_toml

FIELDS = ("sender", "recipient", "subject", "body", "size", "attachment")
OPERATORS = ("regex", "equals", "contains", "in", "in_file", "above", "below")
FINAL_ACTIONS = ("reject", "quarantine", "discard", "redirect")
ADDED_ACTIONS = ("tag", "copy-to", "auto-reply", "notify")
ACTIONS = FINAL_ACTIONS + ADDED_ACTIONS
DIRECTIONS = ("inbound", "outbound", "both")
MAX_PATTERN = 1000  # characters of one regex

_HEADER_NAME = re.compile(r"^[!-9;-~]+$")
_ADDRESS = re.compile(r"^[^@\s<>]+@[^@\s<>]+$")
# a group holding a quantifier, itself quantified: (a+)+ (\w*)* (x|y+){2,}
_NESTED = re.compile(r"\((?:[^()\\]|\\.)*(?:[+*]|\{\d+,\d*\})(?:[^()\\]|\\.)*\)(?:[+*]|\{\d+,\d*\})")


@attrs.frozen
class Condition:
    """One test of a rule: a field of the message, an operator, and whether it is negated."""

    field: str  # one of FIELDS, or "header"
    operator: str  # one of OPERATORS ("in_file" becomes "in" with the file's values)
    header: str = ""  # for field "header": the header's name
    pattern: re.Pattern[str] | None = None
    values: frozenset[str] = frozenset()  # for equals / in (folded unless case_sensitive)
    text: str = ""  # for contains (folded unless case_sensitive)
    number: int = 0  # for above / below (bytes)
    negate: bool = False
    case_sensitive: bool = False
    line: int | None = None

    def matches(self, values: Sequence[str] | int) -> bool:
        """Whether the test holds for a field's values (any of them), negation applied."""
        return self._test(values) != self.negate

    def _test(self, values: Sequence[str] | int) -> bool:
        if isinstance(values, int):
            return values > self.number if self.operator == "above" else values < self.number
        if self.pattern is not None:
            return any(self.pattern.search(value) for value in values)
        folded = values if self.case_sensitive else [value.casefold() for value in values]
        if self.operator == "contains":
            return any(self.text in value for value in folded)
        return any(value in self.values for value in folded)


@attrs.frozen
class AutoReply:
    text: str
    subject: str = ""  # "" = "Auto: " + the message's subject
    sender: str = ""  # the From: of the reply; "" = the message's first recipient
    period: float = 86400.0  # at most one reply per sender per rule in this time


@attrs.frozen
class Rule:
    """A rule: when its conditions hold (all or any), what it does."""

    name: str
    directions: frozenset[str]  # "inbound", "outbound"
    match_all: bool
    conditions: tuple[Condition, ...]
    actions: tuple[str, ...]
    message: str = ""  # the reject reply / the reason logged
    headers: tuple[tuple[str, str], ...] = ()  # tag
    subject_prefix: str = ""  # tag
    redirect_to: str = ""
    copy_to: str = ""
    auto_reply: AutoReply | None = None
    notify: str = ""  # an address, or "postmaster"
    line: int | None = None

    @property
    def final(self) -> str | None:
        """Its action that decides the message (reject, quarantine, discard, redirect), if any."""
        return next((action for action in self.actions if action in FINAL_ACTIONS), None)

    @property
    def reason(self) -> str:
        return self.message or f"rule {self.name!r}"


@attrs.frozen
class RuleSet:
    rules: tuple[Rule, ...] = ()
    files: tuple[str, ...] = ()  # the rule file and the list files it reads

    def for_direction(self, direction: str) -> tuple[Rule, ...]:
        return tuple(rule for rule in self.rules if direction in rule.directions)


class _Table(Section):
    """A Section whose errors name the line of a key within a span of lines of the file."""

    def __init__(self, source: str, text: str, table: Mapping[str, Any], path: str, span: tuple[int, int]):
        super().__init__(source, text, table, path)
        self.span = span  # (first line: the table's header, line after its last)

    def error(self, key: str, problem: str) -> ConfigError:
        full = f"{self.path}.{key}" if key else self.path
        return ConfigError(self.source, full, problem, self.line_of(key))

    def done(self) -> None:
        for key in self.table:
            raise self.error(key, "unknown key (see etc/rules.example.toml for the documented keys)")

    def line_of(self, key: str) -> int:
        first, end = self.span
        if key:
            pattern = re.compile(rf"^\s*(\"{re.escape(key)}\"|'{re.escape(key)}'|{re.escape(key)})\s*=")
            lines = self.text.splitlines()
            for number in range(first, min(end, len(lines) + 1)):
                if pattern.match(lines[number - 1]):
                    return number
        return first


def _headers(text: str) -> list[tuple[str, int]]:
    """Every table header of a TOML text: (its name, line), in order."""
    found = []
    header = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
    for number, line in enumerate(text.splitlines(), 1):
        match = header.match(line)
        if match:
            found.append((match.group(1).replace(" ", ""), number))
    return found


def parse_rules(text: str, source: str, base_dir: str | None = None) -> RuleSet:
    """Parse and check a rule file's text; ConfigError naming the file and line on any problem."""
    data = load_toml(text, source)
    base = base_dir if base_dir is not None else os.path.dirname(os.path.abspath(source))
    total = len(text.splitlines()) + 1
    headers = _headers(text)
    rule_lines = [line for name, line in headers if name == "rule"]
    top = _Table(source, text, data, "", (1, rule_lines[0] if rule_lines else total))
    raw_rules = top.take("rule", list, [])
    top.done()
    rules: list[Rule] = []
    files: list[str] = [source]
    names: set[str] = set()
    for number, raw in enumerate(raw_rules):
        start = rule_lines[number] if number < len(rule_lines) else 1
        end = rule_lines[number + 1] if number + 1 < len(rule_lines) else total
        if not isinstance(raw, dict):
            raise top.error("rule", "must be tables ([[rule]])")
        table = _Table(source, text, raw, f"rule[{number}]", (start, end))
        condition_lines = [line for name, line in headers if name == "rule.if" and start < line < end]
        rule = _rule(table, condition_lines, base, files)
        if rule.name in names:
            raise table.error("name", f"another rule is named {rule.name!r}")
        names.add(rule.name)
        rules.append(rule)
    return RuleSet(tuple(rules), tuple(files))


def load_rules(path: str) -> RuleSet:
    """Read and check the rule file at `path`."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as error:
        raise ConfigError(path, "", f"cannot read the rule file: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(path, "", f"the rule file is not UTF-8 text (byte {error.start})") from None
    return parse_rules(text, path)


def _rule(table: _Table, condition_lines: list[int], base: str, files: list[str]) -> Rule:
    name = table.take("name", str, "")
    if not name.strip():
        raise table.error("name", "is required: a short name for the logs")
    if "direction" not in table.table:
        raise table.error("direction", "is required: inbound, outbound or both")
    direction = table.choice("direction", DIRECTIONS, "inbound")
    match = table.choice("match", ("all", "any"), "all")
    actions = _actions(table)
    raw_conditions = table.take("if", list, [])
    if not raw_conditions:
        raise table.error("if", "a rule needs at least one condition ([[rule.if]])")
    conditions = []
    for index, raw in enumerate(raw_conditions):
        span = table.span
        if index < len(condition_lines):
            following = condition_lines[index + 1] if index + 1 < len(condition_lines) else table.span[1]
            span = (condition_lines[index], following)
        if not isinstance(raw, dict):
            raise table.error("if", "conditions must be tables ([[rule.if]])")
        conditions.append(
            _condition(_Table(table.source, table.text, raw, f"{table.path}.if[{index}]", span), base, files)
        )
    rule = Rule(
        name=name,
        directions=frozenset({"inbound", "outbound"} if direction == "both" else {direction}),
        match_all=match == "all",
        conditions=tuple(conditions),
        actions=actions,
        message=_one_line(table, "message"),
        headers=_tag_headers(table),
        subject_prefix=_one_line(table, "subject_prefix"),
        redirect_to=_address(table, "redirect_to"),
        copy_to=_address(table, "copy_to"),
        auto_reply=_auto_reply(table),
        notify=_notify(table),
        line=table.span[0],
    )
    _needs(table, rule)
    table.done()
    return rule


def _actions(table: _Table) -> tuple[str, ...]:
    value = table.table.get("action")
    if value is None:
        raise table.error("action", f"is required: one of {', '.join(ACTIONS)}, or a list of them")
    actions = (table.take("action", str, ""),) if isinstance(value, str) else table.strings("action")
    for action in actions:
        if action not in ACTIONS:
            raise table.error("action", f"unknown action {action!r} (known: {', '.join(ACTIONS)})")
    finals = [action for action in actions if action in FINAL_ACTIONS]
    if len(finals) > 1:
        raise table.error("action", f"a rule has at most one of {', '.join(FINAL_ACTIONS)}, not {finals}")
    if len(set(actions)) != len(actions) or not actions:
        raise table.error("action", "list each action once")
    return actions


def _needs(table: _Table, rule: Rule) -> None:
    """The options each action needs, and no option for an action the rule does not take."""
    wants = {
        "redirect": ("redirect_to", rule.redirect_to),
        "copy-to": ("copy_to", rule.copy_to),
        "auto-reply": ("reply_text", rule.auto_reply),
    }
    for action, (key, value) in wants.items():
        if action in rule.actions and not value:
            raise table.error(key, f"is required by the {action} action")
        if value and action not in rule.actions:
            raise table.error(key, f"is set but the rule has no {action} action")
    if "tag" in rule.actions and not (rule.headers or rule.subject_prefix):
        raise table.error("action", "tag needs a header or a subject_prefix")
    if (rule.headers or rule.subject_prefix) and "tag" not in rule.actions:
        raise table.error(
            "header" if rule.headers else "subject_prefix", "is set but the rule has no tag action"
        )


def _condition(table: _Table, base: str, files: list[str]) -> Condition:
    field = table.take("field", str, "")
    header = ""
    if field.lower().startswith("header:"):
        header = field.partition(":")[2].strip()
        if not _HEADER_NAME.match(header):
            raise table.error("field", f"{header!r} is not a header name (write header:X-Spam-Flag)")
        field = "header"
    elif field not in FIELDS:
        raise table.error("field", f"must be one of {', '.join(FIELDS)} or header:<Name>; not {field!r}")
    given = [op for op in OPERATORS if op in table.table]
    if len(given) != 1:
        what = f"not {' and '.join(given)}" if given else "none given"
        raise table.error(
            "field" if not given else given[1], f"needs one operator of {', '.join(OPERATORS)} ({what})"
        )
    operator = given[0]
    negate = table.take("not", bool, False)
    case_sensitive = table.take("case_sensitive", bool, False)
    numeric = operator in ("above", "below")
    if numeric != (field == "size"):
        problem = (
            "size is compared with above or below" if field == "size" else f"{operator} is for the size field"
        )
        raise table.error(operator, problem)
    condition = Condition(
        field, operator, header, negate=negate, case_sensitive=case_sensitive, line=table.span[0]
    )

    def fold(value: str) -> str:
        return value if case_sensitive else value.casefold()

    if operator == "regex":
        condition = attrs.evolve(
            condition, pattern=_regex(table, table.take("regex", str, ""), case_sensitive)
        )
    elif operator == "equals":
        condition = attrs.evolve(condition, values=frozenset({fold(table.take("equals", str, ""))}))
    elif operator == "contains":
        text = table.take("contains", str, "")
        if not text:
            raise table.error("contains", "must not be empty (it would match everything)")
        condition = attrs.evolve(condition, text=fold(text))
    elif operator == "in":
        values = table.strings("in")
        if not values:
            raise table.error("in", "must list at least one value")
        condition = attrs.evolve(condition, values=frozenset(fold(v) for v in values))
    elif operator == "in_file":
        path = os.path.normpath(os.path.join(base, table.take("in_file", str, "")))
        listed = _read_values(path, table)
        files.append(path)
        condition = attrs.evolve(condition, operator="in", values=frozenset(fold(v) for v in listed))
    else:
        condition = attrs.evolve(condition, number=table.size(operator, 0))
    table.done()
    return condition


def _regex(table: _Table, text: str, case_sensitive: bool) -> re.Pattern[str]:
    if not text:
        raise table.error("regex", "must not be empty (it would match everything)")
    if len(text) > MAX_PATTERN:
        raise table.error("regex", f"is longer than {MAX_PATTERN} characters")
    if _NESTED.search(text):
        raise table.error("regex", f"{text!r} has a nested quantifier, which can take exponential time")
    try:
        return re.compile(text, 0 if case_sensitive else re.IGNORECASE)
    except re.error as error:
        raise table.error("regex", f"bad regular expression {text!r}: {error}") from None


def _read_values(path: str, table: _Table) -> list[str]:
    """A list file: one value per line; blank lines and lines starting with # are skipped."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as error:
        raise table.error("in_file", f"cannot read {path}: {error.strerror}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(path, "", f"the list is not UTF-8 text (byte {error.start})") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _one_line(table: _Table, key: str) -> str:
    value = table.take(key, str, "")
    if "\r" in value or "\n" in value:
        raise table.error(key, "must be one line")
    return value


def _address(table: _Table, key: str) -> str:
    value = table.take(key, str, "")
    if value and not _ADDRESS.match(value):
        raise table.error(key, f"{value!r} is not a mail address (like archive@example.com)")
    return value


def _tag_headers(table: _Table) -> tuple[tuple[str, str], ...]:
    raw = table.table.get("header")
    values = (table.take("header", str, ""),) if isinstance(raw, str) else table.strings("header")
    headers = []
    for value in values:
        name, colon, text = value.partition(":")
        if not colon or not _HEADER_NAME.match(name.strip()) or "\n" in text or "\r" in text:
            raise table.error("header", f'{value!r} is not a header line (write "X-Rule: matched")')
        headers.append((name.strip(), text.strip()))
    return tuple(headers)


def _auto_reply(table: _Table) -> AutoReply | None:
    text = table.take("reply_text", str, "")
    subject = _one_line(table, "reply_subject")
    sender = _address(table, "reply_from")
    period = table.duration("reply_period", 86400)
    if not text:
        for key in ("reply_subject", "reply_from", "reply_period"):
            if key in table.read and key != "reply_period" and table.read[key]:
                raise table.error(key, "is set but reply_text is not")
        return None
    if period <= 0:
        raise table.error("reply_period", "must be longer than 0 s")
    return AutoReply(text, subject, sender, period)


def _notify(table: _Table) -> str:
    value = table.take("notify", str, "")
    if value and value != "postmaster" and not _ADDRESS.match(value):
        raise table.error("notify", f'{value!r} is not a mail address or "postmaster"')
    actions = table.read.get("action")
    wanted = "notify" in (actions if isinstance(actions, (list, tuple)) else (actions,))
    if value and not wanted:
        raise table.error("notify", "is set but the rule has no notify action")
    return value or ("postmaster" if wanted else "")
