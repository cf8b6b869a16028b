"""The one error type of checkpoint loading."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for the requested model or backbone."""
