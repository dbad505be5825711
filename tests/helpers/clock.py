"""A clock that moves only when told: timings become exact figures instead of bounds on the wall clock."""


class FakeClock:
    """Call it for the time (seconds, as time.time); `advance(s)` moves it on."""

    def __init__(self, start: float = 1_000_000.0):
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now
