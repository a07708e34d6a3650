"""A keyword/regex privacy filter.

Configuration (JSON, or the node's TOML table)::

    {"block": ["regex", ...], "redact": {"entity": "regex", ...}, "class": "pii"}

- ``block``: a request whose text (any segment) matches one of these is refused; so is an answer
  that does, cut off where the match completes.
- ``redact``: each match of ``redact[entity]`` is replaced by a placeholder (``[ENTITY_1]``) and
  the request labelled ``<class>.<entity>.redacted``; entity names are 1-32 of ``[a-z0-9_]``.
- ``class``: the labels' class, ``pii`` by default (routers treat ``pii.*`` labels as personal
  data); 1-32 of ``[a-z0-9_]``.

Patterns are Python regular expressions (``re``), matched case-sensitively unless they say
``(?i)``. At least one rule is required. Block reasons name the rule's index, never the text.
"""

import re

import wit_world
from meridian_plugin import config_error, parse_config
from meridian_plugin import filtering

#: Characters of the answer kept between pieces, so that a block pattern split across two
#: streamed pieces still matches; a match longer than this across pieces is missed.
RESPONSE_WINDOW = 4096

_block = []  # [(index, compiled pattern)]
_redact = []  # [(entity, compiled pattern)]
_class = "pii"
_tail = ""  # the end of the answer seen so far (one instance serves one answer)


def _compile(where: str, source):
    if not isinstance(source, str) or not source:
        raise config_error(f"{where} must be a non-empty regular expression string")
    try:
        return re.compile(source)
    except re.error as e:
        raise config_error(f"{where} is not a valid regular expression: {e}")


def configure(text: str) -> None:
    """Reads and compiles the rules; raises ``Err`` (refusing the plugin) on bad input."""
    global _block, _redact, _class, _tail
    config = parse_config(text, allowed=("block", "redact", "class"))
    block = config.get("block", [])
    redact = config.get("redact", {})
    cls = config.get("class", "pii")
    if not isinstance(block, list):
        raise config_error("`block` must be a list of regular expressions")
    if not isinstance(redact, dict):
        raise config_error("`redact` must be an object of entity name -> regular expression")
    if not isinstance(cls, str) or not filtering.valid_entity(cls):
        raise config_error("`class` must be 1-32 of [a-z0-9_]")
    if not block and not redact:
        raise config_error("no rules: give at least one pattern in `block` or `redact`")
    for entity in redact:
        if not filtering.valid_entity(entity):
            raise config_error(f"redact entity name {entity!r} must be 1-32 of [a-z0-9_]")
    _block = [(i, _compile(f"block[{i}]", p)) for i, p in enumerate(block)]
    _redact = [(e, _compile(f"redact.{e}", p)) for e, p in redact.items()]
    _class = cls
    _tail = ""


def inspect_request(request, segments):
    """Blocks on a block match; otherwise redacts every redact match."""
    for i, pattern in _block:
        for seg in segments:
            if pattern.search(seg.text):
                return filtering.block(f"blocked by the keyword filter's rule block[{i}]")
    redactor = filtering.Redactor()
    for index, seg in enumerate(segments):
        for entity, pattern in _redact:
            redactor.add_matches(index, seg.text, pattern, entity)
    return filtering.allow(redactor.labels(_class), redactor.redactions())


def inspect_response(text: str):
    """Blocks the answer once it matches a block pattern, across piece boundaries."""
    global _tail
    window = _tail + text
    for i, pattern in _block:
        if pattern.search(window):
            return filtering.block_response(f"answer cut off by the keyword filter's rule block[{i}]")
    _tail = window[-RESPONSE_WINDOW:]
    return filtering.allow_response()


class WitWorld(wit_world.WitWorld):
    """The ``privacy-filter`` world's exports."""

    def configure(self, config: str) -> None:
        configure(config)

    def inspect_request(self, request, segments):
        return inspect_request(request, segments)

    def inspect_response(self, text: str):
        return inspect_response(text)
