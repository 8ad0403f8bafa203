"""Exceptions the runtime raises for bad input; each message names the problem and the fix."""


class InputError(ValueError):
    """A conversation, image or video the runtime cannot use as given."""


class ArtifactError(RuntimeError):
    """An artifact directory that is missing, of another format version, or corrupted."""
