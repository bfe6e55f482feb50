"""User-facing errors: the CLI prints them as one line and exits 2."""


class GrokquantError(Exception):
    """An error caused by the user's input, reported without a traceback."""


class DiskFullError(GrokquantError):
    """A write ran out of space (ENOSPC, quota, file-size limit); what was being written has been removed."""


class CheckpointError(GrokquantError):
    """The checkpoint on disk is incomplete, damaged or inconsistent."""
