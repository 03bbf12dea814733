"""The one exception type for mistakes a user can fix (bad files, bad options, bad checkpoints)."""

import argparse
import sys
from collections.abc import Callable


class UserError(Exception):
    """Raised with a message meant for the user; scripts print it as one line and exit with code 2."""


def require(*checks: tuple[bool, str]) -> None:
    """A constructor's argument checks: UserError with the message of the first (ok, message) that is not ok."""
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def exit_code(body: Callable[[], object]) -> int:
    """Run a script's body: a UserError becomes one 'error: ...' line on stderr and exit code 2; otherwise the
    body's own code if it returns an int, else 0."""
    try:
        result = body()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a wrong option is a UserError (one line) instead of a usage dump."""

    def error(self, message):
        raise UserError(message)
