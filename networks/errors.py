"""The one exception type for mistakes a user can make (bad path, bad value, foreign file).

Front doors (CLI, UI) print its message as a single sentence instead of a traceback, so every raise
must read as one sentence that names the file/key/value and says what to do.
"""


class SdloraError(ValueError):
    """A user-facing error whose message is shown as is."""
