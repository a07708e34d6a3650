"""Helpers for routers (the ``router`` world): build an ``outcome`` without spelling out the
generated variant classes.

    from meridian_plugin import routing
    return routing.decide(t for t in targets if t.health != routing.Health.DOWN)
"""

from typing import Iterable, Optional, Sequence

from wit_world.imports import routing as _wit
from wit_world.imports import types as _types

__all__ = ["CachePolicy", "Health", "TargetKind", "route", "decide", "reject", "prefix_match", "NO_TARGET"]

#: The contract's ``cache-policy``: ``DEFAULT``, ``BYPASS``, ``FORCE``.
CachePolicy = _wit.CachePolicy
#: The contract's target ``health``: ``HEALTHY``, ``DEGRADED``, ``DOWN``.
Health = _types.Health
#: The contract's ``target-kind``: ``MANAGED``, ``SERVERLESS``, ``DEDICATED``, ``REMOTE_EDGE``.
TargetKind = _types.TargetKind

#: The refusal :func:`decide` gives when no target is left: an empty decision is invalid.
NO_TARGET = "no target is available for this request"


def route(
    names: Sequence[str],
    model_rewrite: Optional[str] = None,
    cache: "CachePolicy" = CachePolicy.DEFAULT,
) -> "_wit.Outcome":
    """Sends the request to the targets ``names``, in order (the first, then fallbacks).

    Each name must be one of the targets the router was given, once; the host checks it and
    treats a bad decision as a failed router (static order instead).
    """
    return _wit.Outcome_Route(_wit.Decision(list(names), model_rewrite, cache))


def decide(targets: Iterable) -> "_wit.Outcome":
    """Routes to ``targets`` (target records) in the order given, with no model rewrite and the
    tenant's cache policy; no targets at all is a 503 refusal (as the Rust SDK's ``decide``)."""
    names = [t.name for t in targets]
    if not names:
        return reject(503, NO_TARGET)
    return route(names)


def reject(status: int, reason: str) -> "_wit.Outcome":
    """Refuses the request with HTTP ``status`` (400–599) and ``reason``, which the client sees."""
    if not 400 <= status <= 599:
        raise ValueError(f"a refusal's status must be 400-599, got {status}")
    return _wit.Outcome_Reject(_wit.Refusal(status, reason))


def prefix_match(target: str) -> int:
    """During ``route`` (contract 0.1.2): how many of the request's prompt tokens the target named
    ``target`` already holds in its prefix cache, as its engine last reported; 0 for none, for
    targets that do not report a cache (managed APIs, other edges) and for unknown names. A host
    import: it works only inside the node, not in native tests.
    """
    return _wit.prefix_match(target)
