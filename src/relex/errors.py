"""The one exception type for input relex cannot use or an operation it refuses."""


class RelexError(Exception):
    """Bad input or a refused operation.

    The message is a single line that names the file, tensor or flag at fault and says how to fix
    it; the CLI prints it as is (no traceback) and exits with status 2.
    """
