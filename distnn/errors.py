"""The errors a user can fix, which the command line reports in one line with exit code 2."""


class UsageError(ValueError):
    """A bad command-line flag or combination; the message names the flag."""


# Bad input (ConfigError, DataError, CheckpointError and UsageError are ValueErrors), or an
# OSError: an unwritable run directory, a full disk.
USER_ERRORS = (ValueError, OSError)
