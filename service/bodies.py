"""The bytes of request bodies the server holds at once, bounded (NORMSERVE_MAX_BODIES_BYTES).

Each body is counted from its first byte received to its answer: taken from the budget from its
Content-Length before any of it is read, or chunk by chunk as a chunked body arrives (and again as a
compressed one inflates), and given back when the request ends, however it ends. A body that would pass
the budget is refused with 503 and Retry-After, so 48 clients sending 64 MB bodies at once hold at most
the budget, not 3 GB. Only the event loop touches it: a plain counter does.
"""

from __future__ import annotations

from service.errors import Overloaded

__all__ = ["BodyBudget", "Reservation"]


class BodyBudget:
    """The bytes of request bodies the server holds at once (NORMSERVE_MAX_BODIES_BYTES), from the first
    byte received to the answer. A body that would pass it is refused with 503 and Retry-After: from its
    Content-Length before any of it is read, or as a chunked body passes the mark. The event loop is the
    only user, so a plain counter does."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int, whole: bool) -> None:
        if self.held + size > self.limit:
            what = f"a body of {size} bytes" if whole else "this body, as it grows,"
            raise Overloaded(
                f"the server holds {self.held} bytes of request bodies, and {what} would pass the {self.limit} it "
                "takes at once (NORMSERVE_MAX_BODIES_BYTES); retry shortly"
            )
        self.held += size


class Reservation:
    """What one request has taken from the budget; ``release`` gives it back (once)."""

    __slots__ = ("budget", "size")

    def __init__(self, budget: BodyBudget) -> None:
        self.budget, self.size = budget, 0

    def take(self, size: int, whole: bool = False) -> None:
        self.budget.take(size, whole)
        self.size += size

    def release(self) -> None:
        self.budget.held -= self.size
        self.size = 0
