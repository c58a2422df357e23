"""The capability lists remembered per backend member (POP3 terminate
mode's CAPA saved): kept for a while, per member, then asked again."""

from __future__ import annotations

from authgate.config import Address
from authgate.proxy.routes import CAPABILITIES_KEPT_FOR, CapabilityMemory

ONE = Address("127.0.0.1", 1110)
TWO = Address("127.0.0.2", 1110)
LIST = ("USER", "SASL PLAIN")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_learned_list_is_recalled_until_it_is_too_old() -> None:
    clock = Clock()
    memory = CapabilityMemory(clock=clock)
    assert memory.recall("default", ONE) is None
    memory.learn("default", ONE, LIST)
    assert memory.recall("default", ONE) == LIST
    clock.now += CAPABILITIES_KEPT_FOR - 1
    assert memory.recall("default", ONE) == LIST
    clock.now += 1
    assert memory.recall("default", ONE) is None  # ask again
    memory.learn("default", ONE, ("USER",))
    assert memory.recall("default", ONE) == ("USER",)


def test_each_member_of_each_backend_has_its_own_list() -> None:
    memory = CapabilityMemory(clock=Clock())
    memory.learn("default", ONE, LIST)
    assert memory.recall("default", TWO) is None
    assert memory.recall("store2", ONE) is None
    memory.learn("store2", ONE, ("USER",))
    assert memory.recall("default", ONE) == LIST
    assert memory.recall("store2", ONE) == ("USER",)
