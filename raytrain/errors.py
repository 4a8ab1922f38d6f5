"""Errors meant for a person: the CLI prints their message and exits non-zero, without a traceback."""


class StageInputError(RuntimeError):
    """A stage cannot run with what it was given (missing artifact, too little data, …)."""
