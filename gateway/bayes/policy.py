"""What a Bayes score means for a message: thresholds, globally and per recipient domain.

The seed's defaults: a score above 5 tags the subject, above 7 quarantines,
above 9 deletes (scores are 0 to 10; "above" is strictly above, so the 5.0 of a
message with no evidence at all is clean). A threshold of 10 turns its action
off.

A domain may have thresholds of its own. A message has one copy for all its
recipients, so with recipients in domains that disagree the message gets the
strictest action any of them asks for — except deletion, which cannot be
undone: it needs every recipient's domain to ask for it, and otherwise the
message is quarantined instead (kept, so the administrator can still release
it to those who wanted it). No recipient loses mail because another domain is
stricter than theirs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs

from gateway.model import Action

__all__ = ["Policy", "Thresholds"]

# from the mildest to the strictest
_ORDER = (Action.CONTINUE, Action.TAG, Action.QUARANTINE, Action.DISCARD)


@attrs.frozen
class Thresholds:
    """The scores above which a message is tagged, quarantined and deleted."""

    tag: float = 5.0
    quarantine: float = 7.0
    delete: float = 9.0

    def action(self, score: float) -> Action:
        if score > self.delete:
            return Action.DISCARD
        if score > self.quarantine:
            return Action.QUARANTINE
        if score > self.tag:
            return Action.TAG
        return Action.CONTINUE

    def problem(self) -> str | None:
        """Why these thresholds make no sense, or None."""
        for name, value in (("tag", self.tag), ("quarantine", self.quarantine), ("delete", self.delete)):
            if not 0.0 <= value <= 10.0:
                return f"{name} must be a score from 0 to 10, not {value:g}"
        if not self.tag <= self.quarantine <= self.delete:
            return (
                f"thresholds must rise: tag ({self.tag:g}) <= quarantine ({self.quarantine:g})"
                f" <= delete ({self.delete:g})"
            )
        return None


@attrs.frozen
class Policy:
    """The global thresholds and the domains' own (module docstring).

    A recipient's domain is looked up as it is, then its parent domains
    (``mail.example.com``, then ``example.com``); the first listed wins.
    """

    default: Thresholds = Thresholds()
    domains: Mapping[str, Thresholds] = attrs.field(factory=dict)

    def thresholds(self, recipient: str) -> Thresholds:
        domain = recipient.rpartition("@")[2].lower().rstrip(".")
        while domain:
            found = self.domains.get(domain)
            if found is not None:
                return found
            domain = domain.partition(".")[2]
        return self.default

    def action(self, score: float, recipients: Iterable[str]) -> Action:
        """The action for a message to `recipients` (all of them; none: the global thresholds)."""
        actions = {self.thresholds(recipient).action(score) for recipient in recipients}
        if not actions:
            return self.default.action(score)
        strictest = max(actions, key=_ORDER.index)
        if strictest is Action.DISCARD and actions != {Action.DISCARD}:
            return Action.QUARANTINE  # deletion only when every recipient's domain asks for it
        return strictest
