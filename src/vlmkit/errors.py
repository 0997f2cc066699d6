"""The few exception types vlmkit raises on purpose.

Every message names the file, line, field or id at fault and says what to do, so the
command line can print it as is (without a traceback) and exit with status 2.
"""


class VlmkitError(Exception):
    """Base class: an error the user can fix; the CLI prints the message and exits 2."""


class ConfigError(VlmkitError, ValueError):
    """A configuration value or command-line option is wrong."""


class DataError(VlmkitError, ValueError):
    """An input file holds something vlmkit cannot use."""

    def __init__(self, problem: str, path=None, line: int | None = None, record_id: str | None = None):
        self.problem, self.path, self.line, self.record_id = problem, path, line, record_id
        where = str(path) if path is not None else ""
        if line is not None:
            where += f":{line}"
        if record_id is not None:
            where += f" (id {record_id!r})" if where else f"id {record_id!r}"
        super().__init__(f"{where}: {problem}" if where else problem)


class ImageTokenMismatchError(VlmkitError, ValueError):
    """The placeholder tokens in the text disagree with the features the images produce."""
