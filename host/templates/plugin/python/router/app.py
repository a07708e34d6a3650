"""{{name}}: a Meridian router, in Python, that sends each request to the fastest healthy target
first.

Targets that are degraded or down are left out; among the healthy ones, the lowest measured
end-to-end latency comes first, and targets not measured yet (latency 0) come last in the order
given. No healthy target at all: 503. Takes no configuration (``{}``).

componentize-py imports this module once, at build time, and snapshots the interpreter: import
everything you need here at the top, never inside a function.
"""

import wit_world
from meridian_plugin import expect_empty_config
from meridian_plugin import routing


def latency(target) -> float:
    """The sort key: measured latency, unmeasured targets last."""
    return target.latency_ms if target.latency_ms > 0 else float("inf")


class WitWorld(wit_world.WitWorld):
    """The ``router`` world's exports."""

    def configure(self, config: str) -> None:
        # Raise `meridian_plugin.config_error("why")` to refuse a configuration.
        expect_empty_config(config)

    def route(self, request, targets):
        healthy = [t for t in targets if t.health == routing.Health.HEALTHY]
        # Stable sort: equal latencies keep the order given.
        return routing.decide(sorted(healthy, key=latency))
