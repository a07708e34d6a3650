"""Meridian's guest SDK for plugins written in Python (built with componentize-py).

A plugin is a module (``app.py``) with a ``WitWorld`` class implementing the ``router`` or the
``privacy-filter`` world of ``wit/meridian-plugin.wit``. This package holds what both kinds share:

- :func:`parse_config` / :func:`expect_empty_config`: read the JSON ``configure`` receives, raising
  the ``Err`` the contract wants for bad input;
- :func:`carries_unredacted_pii` / :func:`residency_allows`: the data-residency rule, as the Rust
  SDK (``plugins/sdk``) states it;
- :func:`log`, :func:`counter_add`, :func:`histogram_record`, :func:`now_ms`,
  :func:`answer_triggers`, :func:`request_triggers`: the ``host`` imports.

Routers add :mod:`meridian_plugin.routing`, filters :mod:`meridian_plugin.filtering`; import the one
for your world only, as each imports its world's generated bindings.

componentize-py runs the app's imports once at build time and snapshots the interpreter
(pre-initialisation), and the component has no files at run time: import every module you need at
the top of ``app.py``, never inside a function.
"""

import json
from typing import Any, Dict, Iterable, Optional

from componentize_py_types import Err
from wit_world.imports import host

__all__ = [
    "config_error",
    "parse_config",
    "expect_empty_config",
    "carries_unredacted_pii",
    "residency_allows",
    "log",
    "counter_add",
    "histogram_record",
    "now_ms",
    "answer_triggers",
    "request_triggers",
    "Level",
]

#: Log severities (the contract's ``host.level``).
Level = host.Level


def config_error(message: str) -> Err:
    """The exception ``configure`` raises to refuse its configuration: ``raise config_error(...)``.

    componentize-py maps a raised ``Err(str)`` to the ``error`` case of ``result<_, string>``;
    any other exception would trap instead of refusing cleanly.
    """
    return Err(message)


def parse_config(text: str, allowed: Optional[Iterable[str]] = None) -> Dict[str, Any]:
    """Parses the configuration JSON, which must be an object (the node's TOML table).

    ``allowed``, when given, lists the keys the plugin knows; any other key is refused, so that a
    misspelt option fails at load time instead of being silently ignored. Raises
    :func:`config_error` (an ``Err``) on bad input.
    """
    source = text.strip() or "{}"
    try:
        config = json.loads(source)
    except ValueError as e:
        raise config_error(f"configuration is not valid JSON: {e}")
    if not isinstance(config, dict):
        raise config_error(f"configuration must be a JSON object, got {source}")
    if allowed is not None:
        known = set(allowed)
        unknown = sorted(k for k in config if k not in known)
        if unknown:
            expected = ", ".join(sorted(known)) or "none"
            raise config_error(f"unknown configuration keys {unknown} (known: {expected})")
    return config


def expect_empty_config(text: str) -> None:
    """Accepts only an empty object (or nothing), for plugins that take no configuration."""
    config = parse_config(text)
    if config:
        raise config_error(f"this plugin takes no configuration keys, got {text.strip()}")


def carries_unredacted_pii(request) -> bool:
    """Whether the request still holds personal data: a ``pii.*`` label not ending in ``.redacted``.

    Read the labels, never ``request.redacted``: that flag says something was redacted, not that
    nothing personal is left.
    """
    return any(l.startswith("pii.") and not l.endswith(".redacted") for l in request.labels)


def residency_allows(request, target) -> bool:
    """The shared data-residency rule (as ``meridian_plugin_sdk::residency_allows``).

    A request with unredacted personal data may go only to the tenant's own infrastructure or to
    a target whose region is in ``request.allowed_regions`` (empty: any region, but a target of
    unknown region is still refused, as nobody can vouch for where it runs). Any other request
    may go anywhere.
    """
    if not carries_unredacted_pii(request) or target.own_infrastructure:
        return True
    if target.region is None:
        return False
    return not request.allowed_regions or target.region in request.allowed_regions


def log(level: "host.Level", message: str) -> None:
    """Writes a line to the node's log (capped in length and number per call)."""
    host.log(level, message)


def counter_add(name: str, delta: int = 1) -> None:
    """Adds ``delta`` to the counter ``name`` (up to 32 names per plugin)."""
    host.counter_add(name, delta)


def histogram_record(name: str, value: float) -> None:
    """Records ``value`` in the histogram ``name`` (up to 32 names per plugin)."""
    host.histogram_record(name, value)


def now_ms() -> int:
    """Milliseconds since the Unix epoch, from the node's clock."""
    return host.now_ms()


def answer_triggers(triggers: Iterable[str]) -> None:
    """From ``configure``, for a filter: the answer text it needs. The host then shows
    ``inspect_response`` nothing of an answer before one of ``triggers`` appears in it (then that
    trigger's context, up to 256 bytes before it, and every later piece); an empty list means
    never. Without this call the filter sees every piece. At most 64 triggers of 1-64 bytes."""
    host.answer_triggers(list(triggers))


def request_triggers(triggers: Iterable[str]) -> None:
    """From ``configure``, for a filter (contract 0.1.3): the request text it needs. The host then
    calls ``inspect_request`` only for a request one of whose segments contains one of
    ``triggers``, and allows every other request unchanged without a call; declare what every
    finding must contain. An empty list means never. Without this call the filter sees every
    request. At most 64 triggers of 1-64 bytes."""
    host.request_triggers(list(triggers))
