"""A Python privacy filter whose ``inspect_request`` allocates without bound until the host's
memory cap stops it.

Each allocation is four times the last (1 MiB, 4 MiB, 16 MiB, 64 MiB…) and zero-filled, so the
pages are really used, and the request that crosses the cap comes within a few milliseconds: well
inside the default 20 ms deadline, so that the host must report the memory limit, not a timeout.
CPython turns the refused ``memory.grow`` into ``MemoryError``; that escapes the export, which
traps, and the host classifies the trap by its limiter's record as the memory limit.
"""

import wit_world


class WitWorld(wit_world.WitWorld):
    def configure(self, config: str) -> None:
        pass

    def inspect_request(self, request, segments):
        hoard = []
        size = 1 << 20
        while True:
            hoard.append(bytearray(size))
            size *= 4

    def inspect_response(self, text: str):
        raise AssertionError("not reached: the fixture is run on requests")
