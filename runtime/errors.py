"""Exceptions the runtime raises for bad input; each message names the problem and the fix."""


class InputError(ValueError):
    """A conversation, image, video or generation option the runtime cannot use as given."""


class ArtifactError(RuntimeError):
    """An artifact directory that is missing, of another format version, or corrupted."""


class ConfigError(ValueError):
    """A load-time setting (backend, providers, threads, cache directory) the runtime cannot use."""
