"""Helpers for privacy filters (the ``privacy-filter`` world): verdicts, labels, and redactions
with the byte offsets the contract wants.

The contract's offsets are **UTF-8 byte** offsets into a segment's text, while Python indexes
strings by code point: ``"né@x.io".find("@")`` is 2, but the ``@`` starts at byte 3. Collect
spans in code points with a :class:`Redactor`, which converts them, and merges overlapping ones
(the host refuses overlapping redactions of one segment).

    redactor = filtering.Redactor()
    for i, seg in enumerate(segments):
        redactor.add_matches(i, seg.text, EMAIL, "email")
    return filtering.allow(redactor.labels(), redactor.redactions())
"""

import re
from typing import Dict, Iterable, List, Optional, Pattern, Sequence, Set, Tuple

from wit_world.imports import filtering as _wit

__all__ = [
    "SegmentKind",
    "allow",
    "block",
    "allow_response",
    "block_response",
    "finding_label",
    "redacted_label",
    "valid_entity",
    "byte_offsets",
    "Redactor",
]

#: The contract's ``segment-kind``: ``SYSTEM``, ``USER``, ``ASSISTANT``, ``TOOL_RESULT``,
#: ``TOOL_ARGUMENTS``.
SegmentKind = _wit.SegmentKind

_ENTITY = re.compile(r"[a-z0-9_]{1,32}")


def allow(labels: Iterable[str] = (), redactions: Iterable["_wit.Redaction"] = ()) -> "_wit.RequestVerdict":
    """Lets the request through with ``labels`` (sorted, without duplicates) and ``redactions``."""
    return _wit.RequestVerdict_Allow(_wit.Inspection(sorted(set(labels)), list(redactions)))


def block(reason: str) -> "_wit.RequestVerdict":
    """Refuses the request; ``reason`` goes to the client, so name the rule, not the data."""
    return _wit.RequestVerdict_Block(reason)


def allow_response() -> "_wit.ResponseVerdict":
    """Passes a piece of the answer on."""
    return _wit.ResponseVerdict_Allow()


def block_response(reason: str) -> "_wit.ResponseVerdict":
    """Cuts the answer off here; ``reason`` goes to the client as an error."""
    return _wit.ResponseVerdict_Block(reason)


def valid_entity(entity: str) -> bool:
    """Whether ``entity`` can name a placeholder: 1–32 of ``[a-z0-9_]``, as the contract says."""
    return _ENTITY.fullmatch(entity) is not None


def finding_label(entity: str, cls: str = "pii") -> str:
    """The label of a finding left in the text: ``pii.email``. Routers keep such a request in
    allowed regions when the class is ``pii``."""
    return f"{cls}.{entity}"


def redacted_label(entity: str, cls: str = "pii") -> str:
    """The label of a finding this filter redacts: ``pii.email.redacted``."""
    return f"{cls}.{entity}.redacted"


def byte_offsets(text: str, positions: Iterable[int]) -> Dict[int, int]:
    """Maps code-point positions in ``text`` (each 0..len(text)) to UTF-8 byte offsets.

    One pass over the text however many positions: it encodes only the pieces between
    consecutive positions.
    """
    wanted = sorted(set(positions))
    if text.isascii():
        return {p: p for p in wanted}
    out: Dict[int, int] = {}
    cp, byte = 0, 0
    for p in wanted:
        if not 0 <= p <= len(text):
            raise IndexError(f"position {p} is outside a text of {len(text)} characters")
        byte += len(text[cp:p].encode("utf-8"))
        cp = p
        out[p] = byte
    return out


class Redactor:
    """Collects values to redact, in code-point spans, and gives the contract's redactions.

    Overlapping spans of one segment are merged into one (the union, under the first
    span's entity), so every matched character is redacted and the host gets no overlap.
    """

    def __init__(self) -> None:
        # segment index -> (text, [(start, end, entity)]) in code points
        self._spans: Dict[int, Tuple[str, List[Tuple[int, int, str]]]] = {}
        self._entities: Set[str] = set()

    def add(self, segment: int, text: str, start: int, end: int, entity: str) -> None:
        """Redacts ``text[start:end]`` (code points) of segment ``segment`` as ``entity``.

        An empty span is ignored (a regex may match the empty string); a bad entity name or a
        span outside the text raises ``ValueError``.
        """
        if not valid_entity(entity):
            raise ValueError(f"invalid entity name {entity!r}: want 1-32 of [a-z0-9_]")
        if not 0 <= start <= end <= len(text):
            raise ValueError(f"span {start}..{end} is outside a text of {len(text)} characters")
        if start == end:
            return
        known_text, spans = self._spans.setdefault(segment, (text, []))
        if known_text is not text and known_text != text:
            raise ValueError(f"segment {segment} was given two different texts")
        spans.append((start, end, entity))
        self._entities.add(entity)

    def add_matches(self, segment: int, text: str, pattern: Pattern[str], entity: str) -> int:
        """Redacts every non-empty match of ``pattern`` in ``text``; returns how many there were."""
        count = 0
        for m in pattern.finditer(text):
            if m.end() > m.start():
                self.add(segment, text, m.start(), m.end(), entity)
                count += 1
        return count

    def entities(self) -> Set[str]:
        """The entity types redacted so far."""
        return set(self._entities)

    def labels(self, cls: str = "pii") -> List[str]:
        """``<cls>.<entity>.redacted`` for each entity redacted, sorted."""
        return sorted(redacted_label(e, cls) for e in self._entities)

    def redactions(self) -> List["_wit.Redaction"]:
        """The redactions, in byte offsets, sorted by segment and start, never overlapping."""
        out: List[_wit.Redaction] = []
        for segment in sorted(self._spans):
            text, spans = self._spans[segment]
            merged: List[List] = []
            for start, end, entity in sorted(spans, key=lambda s: (s[0], -s[1])):
                if merged and start < merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], end)
                else:
                    merged.append([start, end, entity])
            offsets = byte_offsets(text, (p for s in merged for p in s[:2]))
            for start, end, entity in merged:
                out.append(_wit.Redaction(segment, offsets[start], offsets[end], entity))
        return out
