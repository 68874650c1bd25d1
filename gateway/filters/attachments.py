"""Attachments ("attachments"): names and types of attachments and of the files inside archives.

At the end of DATA every attachment of the shared parse is judged, and so is
every file inside a zip, 7z or RAR attachment, nested archives too, within
limits (`gateway.filters._archives`: a zip bomb is refused, never unpacked):

- blocked: a name with a blocked extension (Gmail's list by default: .exe .scr
  .js .vbs .lnk .iso ...), content of a blocked type whatever its name (a
  Windows program named ``photo.jpg``: types come from the bytes, see
  `gateway.filters._filetypes`), or a blocked declared content type;
- double extensions and disguised names (``invoice.pdf.exe``, a right-to-left
  override, blanks hiding the extension);
- encrypted archives, archive members and Office documents (nothing in them
  can be checked);
- Office documents with macros (VBA or Excel 4), found with oletools;
- archives over the limits (bombs), archives and documents that cannot be read,
  attachments over `max_attachment_size`, and messages too big for the parse to
  have seen whole (`truncated`).

Each of these has a policy: allow, tag, quarantine or reject. The message gets
the strongest action of its findings (reject > quarantine > tag), with a reason
naming each attachment by its path inside the archives
(``invoice.zip/inner.zip/evil.exe: blocked name (.exe)``); a tag adds the
findings in a header. The work runs in a small thread pool of the filter's own,
off the reactor. A finding about a broken archive is a policy decision; a bug
raises and the chain runner applies the filter's failure verdict.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from zope.interface import implementer

from gateway.config import Section
from gateway.content import Attachment, ParsedMessage
from gateway.filters import FilterServices, Request
from gateway.filters._archives import ArchiveLimits, Problem, keep_content, list_archive, zip_kind
from gateway.filters._filetypes import (
    ARCHIVE_TYPES,
    DEFAULT_BLOCKED_EXTENSIONS,
    DEFAULT_BLOCKED_TYPES,
    OFFICE_EXTENSIONS,
    describe_type,
    disguised_name,
    double_extension,
    extension,
    extensions,
    sniff,
)
from gateway.filters._office import examine
from gateway.interfaces import IFilter
from gateway.model import CONTINUE, Action, Stage, Verdict

log = Logger(namespace="mailgate.filter.attachments")

T = TypeVar("T")
POLICIES = ("allow", "tag", "quarantine", "reject")
_STRENGTH = {"allow": 0, "tag": 1, "quarantine": 2, "reject": 3}
DEFAULT_BLOCKED_CONTENT_TYPES = (
    "application/x-msdownload",
    "application/x-dosexec",
    "application/x-msdos-program",
    "application/x-ms-shortcut",
    "application/hta",
)
MAX_REASON_FINDINGS = 5  # in a reason; the rest are counted


@attrs.frozen
class Policy:
    """What the filter looks for and what it does about each kind of finding."""

    blocked_extensions: frozenset[str] = frozenset(DEFAULT_BLOCKED_EXTENSIONS)
    blocked_types: frozenset[str] = frozenset(DEFAULT_BLOCKED_TYPES)
    blocked_content_types: frozenset[str] = frozenset(DEFAULT_BLOCKED_CONTENT_TYPES)
    max_attachment_size: int = 0  # 0: no limit of its own (the SMTP size limit holds)
    limits: ArchiveLimits = attrs.field(factory=ArchiveLimits)
    blocked: str = "reject"
    double_extensions: str = "reject"
    encrypted: str = "quarantine"
    macros: str = "quarantine"
    bombs: str = "reject"
    unreadable: str = "quarantine"
    oversize: str = "reject"
    truncated: str = "quarantine"
    header: str = "X-Mailgate-Attachments"


@attrs.frozen
class Finding:
    """One thing wrong with one file, and the policy's action for it."""

    action: str  # tag / quarantine / reject (allow findings are not kept)
    path: str  # "invoice.zip/inner.zip/evil.exe"
    problem: str  # "blocked name (.exe)"

    def describe(self) -> str:
        return f"{self.path}: {self.problem}"


def inspect_message(parsed: ParsedMessage, policy: Policy) -> list[Finding]:
    """Every finding about a message's attachments (pure: runs in the filter's threads)."""
    findings = _Findings(policy)
    if parsed.truncated:
        findings.add(
            "truncated", "(message)", "not inspected whole (over a [content] limit: size, parts or depth)"
        )
    for number, attachment in enumerate(parsed.attachments, 1):
        _attachment(findings, number, attachment)
    return findings.found


class _Findings:
    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.found: list[Finding] = []

    def add(self, policy_name: str, path: str, problem: str) -> None:
        action = getattr(self.policy, policy_name)
        if action != "allow":
            self.found.append(Finding(action, path, problem))


def _attachment(findings: _Findings, number: int, attachment: Attachment) -> None:
    policy = findings.policy
    path = attachment.filename or f"(attachment {number}, {attachment.content_type})"
    name = attachment.filename or ""
    if attachment.content_type.lower() in policy.blocked_content_types:
        findings.add("blocked", path, f"blocked content type ({attachment.content_type})")
    if policy.max_attachment_size and attachment.size > policy.max_attachment_size:
        findings.add("oversize", path, f"{attachment.size} bytes, more than {policy.max_attachment_size}")
    _file(findings, path, name, sniff(attachment.payload), attachment.payload)


def _file(
    findings: _Findings, path: str, name: str, kind: str | None, content: bytes | None, *, walk: bool = True
) -> None:
    """Judge one file (an attachment or an archive member) by name, type and content.

    `walk` False: an archive member that `list_archive` has walked already.
    """
    policy = findings.policy
    ext = extension(name)
    if ext in policy.blocked_extensions:
        findings.add("blocked", path, f"blocked name (.{ext})")
    if double_extension(name):
        findings.add("double_extensions", path, f"double extension (.{'.'.join(extensions(name)[-2:])})")
    elif disguised_name(name):
        findings.add("double_extensions", path, "a name that hides its extension")
    if kind in policy.blocked_types and ext not in policy.blocked_extensions:
        shown = f"named .{ext}" if ext else "with no extension"
        findings.add("blocked", path, f"{describe_type(kind)} {shown}")
    if content is None:
        return
    if kind == "zip":
        kind = zip_kind(content)
    if walk and (kind in ARCHIVE_TYPES or kind == "ooxml"):
        _archive(findings, path, kind, content)
    if kind in ("ole", "ooxml") or (kind is None and ext in OFFICE_EXTENSIONS):
        _document(findings, path, name, content)


def _archive(findings: _Findings, path: str, kind: str, content: bytes) -> None:
    listing = list_archive(path, kind, content, findings.policy.limits)
    for trouble in listing.troubles:
        if trouble.problem is Problem.ENCRYPTED:
            findings.add("encrypted", trouble.path, trouble.detail)
        elif trouble.problem is Problem.BOMB:
            findings.add("bombs", trouble.path, f"refused unopened: {trouble.detail}")
        else:
            findings.add("unreadable", trouble.path, f"archive {trouble.detail}")
    for member in listing.members:
        if member.encrypted:
            _file(findings, member.path, member.name, None, None)  # its name still tells
            continue
        kept = member.content if keep_content(member.name, member.kind) else None
        _file(findings, member.path, member.name, member.kind, kept, walk=False)


def _document(findings: _Findings, path: str, name: str, content: bytes) -> None:
    report = examine(name, content)
    if report.encrypted:
        findings.add("encrypted", path, "encrypted document")
    if report.macros:
        findings.add("macros", path, "Office document with macros")
    if report.unreadable is not None:
        findings.add("unreadable", path, f"document {report.unreadable}")


def verdict_of(findings: list[Finding], header: str = Policy.header) -> Verdict:
    """The strongest action among the findings, with a reason naming them."""
    if not findings:
        return CONTINUE
    strongest = max(findings, key=lambda finding: _STRENGTH[finding.action]).action
    shown = "; ".join(finding.describe() for finding in findings[:MAX_REASON_FINDINGS])
    if len(findings) > MAX_REASON_FINDINGS:
        shown += f"; and {len(findings) - MAX_REASON_FINDINGS} more"
    if strongest == "reject":
        return Verdict.reject(f"Attachment refused: {shown}")
    if strongest == "quarantine":
        return Verdict(Action.QUARANTINE, f"attachment held: {shown}")
    return Verdict(Action.TAG, f"attachment: {shown}", headers=((header, shown),))


Runner = Callable[..., Deferred[Any]]


def inline_runner(function: Callable[..., T], *arguments: Any) -> Deferred[T]:
    """Run the inspection in the caller's thread (tests, and a gateway that wants no threads)."""
    return maybeDeferred(function, *arguments)


class ThreadRunner:
    """Runs inspections in a small pool of threads of their own (never the reactor's shared one)."""

    def __init__(self, reactor: Any, threads: int) -> None:
        self.reactor = reactor
        self.threads = threads
        self._pool: Any = None

    def __call__(self, function: Callable[..., T], *arguments: Any) -> Deferred[T]:
        from twisted.internet.threads import deferToThreadPool
        from twisted.python.threadpool import ThreadPool

        if self._pool is None:
            self._pool = ThreadPool(0, self.threads, name="mailgate-attachments")
            self._pool.start()
            self.reactor.addSystemEventTrigger("during", "shutdown", self._pool.stop)
        result: Deferred[T] = deferToThreadPool(self.reactor, self._pool, function, *arguments)
        return result


@implementer(IFilter)
class Attachments:
    """Judges attachments and the files inside archive attachments (module docstring)."""

    name = "attachments"
    stages = frozenset({Stage.DATA})

    def __init__(self, policy: Policy = Policy(), run: Runner = inline_runner) -> None:
        self.policy = policy
        self.run = run

    @classmethod
    def from_config(cls, options: Section, services: FilterServices) -> Attachments:
        def policy(key: str, default: str) -> str:
            return options.choice(key, POLICIES, default)

        def lower_set(key: str, default: tuple[str, ...]) -> frozenset[str]:
            return frozenset(value.lower().lstrip(".") for value in options.strings(key, default))

        defaults = Policy()
        limits = ArchiveLimits(
            max_depth=options.positive("max_depth", defaults.limits.max_depth),
            max_files=options.positive("max_files", defaults.limits.max_files),
            max_total_size=options.size("max_total_size", defaults.limits.max_total_size),
            max_ratio=options.positive("max_ratio", defaults.limits.max_ratio),
            ratio_min_size=options.size("ratio_min_size", defaults.limits.ratio_min_size),
        )
        types = lower_set("blocked_types", DEFAULT_BLOCKED_TYPES)
        known_types = {"pe", "elf", "mach-o", "lnk", "script", "iso", "cab", "ole", "pdf", "rtf"}
        for kind in sorted(types - known_types):
            raise options.error(
                "blocked_types", f"unknown type {kind!r} (known: {', '.join(sorted(known_types))})"
            )
        header = options.take("header", str, defaults.header)
        if not header or not all(33 <= ord(ch) <= 126 and ch != ":" for ch in header):
            raise options.error("header", f"{header!r} is not a header field name")
        built = Policy(
            blocked_extensions=lower_set("blocked_extensions", DEFAULT_BLOCKED_EXTENSIONS),
            blocked_types=types,
            blocked_content_types=frozenset(
                value.lower()
                for value in options.strings("blocked_content_types", DEFAULT_BLOCKED_CONTENT_TYPES)
            ),
            max_attachment_size=options.size("max_attachment_size", 0),
            limits=limits,
            blocked=policy("blocked", defaults.blocked),
            double_extensions=policy("double_extensions", defaults.double_extensions),
            encrypted=policy("encrypted", defaults.encrypted),
            macros=policy("macros", defaults.macros),
            bombs=policy("bombs", defaults.bombs),
            unreadable=policy("unreadable", defaults.unreadable),
            oversize=policy("oversize", defaults.oversize),
            truncated=policy("truncated", defaults.truncated),
            header=header,
        )
        threads = options.take("threads", int, 2)
        if threads < 0:
            raise options.error("threads", "must be 0 (inspect in the reactor's thread) or more")
        run: Runner = ThreadRunner(services.reactor, threads) if threads else inline_runner
        return cls(built, run)

    def check(self, request: Request) -> Verdict | Deferred[Verdict]:
        if request.message is None:
            return CONTINUE
        policy = self.policy

        def inspect(parsed: ParsedMessage) -> Deferred[list[Finding]]:
            if not parsed.attachments and not parsed.truncated:
                return maybeDeferred(list)
            return self.run(inspect_message, parsed, policy)

        def decide(findings: list[Finding]) -> Verdict:
            return verdict_of(findings, policy.header)

        return request.message.parsed().addCallback(inspect).addCallback(decide)
