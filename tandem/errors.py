"""Errors a user can cause: shown as one clear message, never as a traceback."""


class TandemError(Exception):
    """Base for errors that carry a message meant for the user."""


class InvalidRequest(TandemError):
    """A request the engine refuses: bad prompt, bad sampling settings, too long for the context."""


class ModelLoadError(TandemError):
    """A model path that is missing or does not hold a model we can read."""


class NoRoom(TandemError):
    """No row or no KV-cache blocks are free: the caller should retry later or go elsewhere."""
