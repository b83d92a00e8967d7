"""One exception type for every user-facing error.

The CLI prints ``str(error)`` on one line and exits 2, so every message must name the
offending field or path and say what was expected.
"""


class UnlearnSearchError(ValueError):
    """Bad input: a data file, a model path, a search space or an option."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


def one_of(value: object, choices) -> str:
    """``one of a, b, c``, and the closest choice when ``value`` looks like a misspelling of one:
    the ``expected`` part of an error about an unknown name."""
    import difflib

    names = [str(c) for c in choices]
    close = difflib.get_close_matches(str(value), names, n=1, cutoff=0.75) if isinstance(value, str) else []
    return f"one of {', '.join(names) or 'none'}" + (f"; did you mean {close[0]!r}?" if close else "")
