"""The project's error types: what the CLI turns into one line and an exit code."""


class UserError(Exception):
    """Bad input (recipe, data, paths, unsupported combination): one line, exit code 2, nothing written."""

    exit_code = 2
