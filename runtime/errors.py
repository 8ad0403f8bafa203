"""Exceptions the runtime raises for bad input; each message names the problem and the fix."""


class InputError(ValueError):
    """A conversation, image, video or generation option the runtime cannot use as given."""


class MemoryShortage(InputError):
    """A request whose estimated peak exceeds the memory available to it. `source` says where that figure came
    from: "memory_limit" (fixed), or what the system has now ("MemAvailable", the cgroup's limit), which
    memory freed elsewhere in the process raises."""

    def __init__(self, message: str, source: str):
        super().__init__(message)
        self.source = source


class ArtifactError(RuntimeError):
    """An artifact directory that is missing, of another format version, or corrupted."""


class ConfigError(ValueError):
    """A load-time setting (backend, providers, threads, cache directory) the runtime cannot use."""
