"""A router that applies only the data-residency rule, in Python (the twin of plugins/residency).

Requests with unredacted personal data (a ``pii.*`` label without the ``.redacted`` suffix) go only
to the tenant's own infrastructure or to targets in the allowed regions; everything else keeps the
order given. When personal data stays in the text and no target qualifies, the request is refused
with 451; no targets at all is a 503. Takes no configuration (``{}``).
"""

import wit_world
from meridian_plugin import carries_unredacted_pii, expect_empty_config, residency_allows
from meridian_plugin import routing

#: Why a request was refused: it names the rule, not the data.
UNAVAILABLE = (
    "unavailable for legal reasons: the request carries unredacted personal data and no target "
    "serving its model is in a region the tenant allows"
)


def configure(config: str) -> None:
    """Accepts only an empty configuration."""
    expect_empty_config(config)


def route(request, targets):
    """Keeps the targets the residency rule allows, in the order given."""
    allowed = [t for t in targets if residency_allows(request, t)]
    if not allowed and carries_unredacted_pii(request):
        return routing.reject(451, UNAVAILABLE)
    return routing.decide(allowed)


class WitWorld(wit_world.WitWorld):
    """The ``router`` world's exports."""

    def configure(self, config: str) -> None:
        configure(config)

    def route(self, request, targets):
        return route(request, targets)
