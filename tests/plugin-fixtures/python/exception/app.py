"""A Python router whose ``route`` raises: the uncaught exception must reach the host as a trap."""

import wit_world


class WitWorld(wit_world.WitWorld):
    def configure(self, config: str) -> None:
        pass

    def route(self, request, targets):
        raise RuntimeError("py_fixture_exception: route always raises")
