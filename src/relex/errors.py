"""The one exception type for input relex cannot use or an operation it refuses."""


class RelexError(Exception):
    """Bad input or a refused operation.

    The message is a single line that names the file, tensor or flag at fault and says how to fix
    it; the CLI prints it as is (no traceback) and exits with status 2.
    """


def one_line(e: BaseException) -> str:
    """The whole message on one line (names taken from a damaged file may hold line breaks):
    what the CLI prints."""
    return str(e).replace("\r", "\\r").replace("\n", "\\n")


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of a message (or the exception's type when it has none), at most `limit`
    characters: how another library's error is quoted inside one of relex's lines."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]
