"""gruexp: character-level GRU language models on The Time Machine (d2l's GRU chapter)."""

__version__ = "0.1.0"


class UserError(ValueError):
    """A mistake in the user's input: printed as one line that names the fix, never as a traceback."""
