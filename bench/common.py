"""What every benchmark module shares with the harness."""


class Unavailable(Exception):
    """A provider that cannot run here; the message says why."""
