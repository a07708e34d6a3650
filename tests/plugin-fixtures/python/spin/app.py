"""A Python router whose ``route`` never returns: the host's epoch deadline must stop it."""

import wit_world


class WitWorld(wit_world.WitWorld):
    def configure(self, config: str) -> None:
        pass

    def route(self, request, targets):
        n = 0
        while True:
            n += 1
