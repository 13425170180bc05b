"""The project's error types: each one is a user-facing failure that the CLI prints as one red line."""

from __future__ import annotations


class PreserveError(Exception):
    """A failure the user can act on (bad file, unsupported model, failed check). CLI exit code 1."""


class PassError(PreserveError):
    """A pass of the pipeline failed; the message names the pass and the passes run before it."""


class UsageError(PreserveError):
    """A bad option value or combination of options. CLI exit code 2, like the parser's own errors."""
