"""One base class for mistakes in what a user gave us (config, files, names).

The CLI prints these as one line and exits 2; anything else is a bug and keeps its
traceback."""


class UserError(ValueError):
    """Bad input; str() names the field or file and what would be accepted."""
