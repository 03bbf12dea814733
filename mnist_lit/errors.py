"""The one exception type for mistakes a user can fix (bad files, bad options, bad checkpoints)."""


class UserError(Exception):
    """Raised with a message meant for the user; scripts print it as one line and exit with code 2."""
