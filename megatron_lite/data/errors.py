"""The one exception the data pipeline raises for bad input."""


class DataError(ValueError):
    """Bad data or a bad data setting; ``str(err)``: one line naming the file or key and the fix."""
