"""The errors a user can fix, which the command line reports in one line with exit code 2."""
import argparse
import sys


class UsageError(ValueError):
    """A bad command-line flag or combination; the message names the flag."""


# Bad input (ConfigError, DataError, CheckpointError and UsageError are ValueErrors), or an
# OSError: an unwritable run directory, a full disk.
USER_ERRORS = (ValueError, OSError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose bad flags are one line, "distnn: error: COMMAND: ...", exit 2: the
    usage block only with --help. add_subparsers makes its subparsers of this class too."""

    def error(self, message):
        command = self.prog.removeprefix("distnn").strip()  # "train" of "distnn train"
        where = f"{command}: " if command else ""
        self.exit(2, f"distnn: error: {where}{' '.join(message.split())} "
                     f"(see {self.prog} --help)\n")


def warn(message) -> None:
    """'distnn: warning: <message>' on stderr: misuse that still runs (the caller prints it on
    one rank)."""
    print(f"distnn: warning: {message}", file=sys.stderr, flush=True)
