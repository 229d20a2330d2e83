"""The one exception type users see for bad input; the CLI turns it into a one-line error."""


class GraceInputError(ValueError):
    """Raised for input that cannot be used: names the file or field and what is wrong."""
