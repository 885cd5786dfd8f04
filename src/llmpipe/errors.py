"""One exception type per kind of user-facing failure.

Messages name the key or file and what was expected."""


class PipelineError(Exception):
    """Base class: the message is meant for the user, printed without a traceback by scripts."""


class ConfigError(PipelineError):
    """A config key has a bad value."""


class SourceError(PipelineError):
    """A model source (package, folder, hub repo) is missing or not what was expected."""


class IntegrityError(PipelineError):
    """A file does not match its manifest (size or sha256), or is truncated/corrupt."""


class ResourceError(PipelineError):
    """The machine lacks what a step needs (disk space, RAM disk room, a GPU)."""
