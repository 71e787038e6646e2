"""User-facing errors.

Every problem a user can fix (a missing file, a malformed annotation, a checkpoint from
another model) is raised as a :class:`CMNError` subclass whose message names the file or
flag and the cause. The command-line tools print these as one line and exit non-zero;
anything else is a bug in cmn and keeps its traceback.
"""


class CMNError(Exception):
    """Base class: a problem with the user's input, not a bug in cmn."""


class DataError(CMNError):
    """An annotation file, image or report that cannot be used."""


class CheckpointError(CMNError):
    """A checkpoint bundle that is missing, incomplete or does not match."""


class ConfigError(CMNError):
    """An option or combination of options that cannot work."""
