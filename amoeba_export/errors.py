"""One exception hierarchy for every failure a user can fix.

Each error carries a one-line message that says what went wrong *and* what to do about it; the CLI
prints ``error: <message>`` and exits with :attr:`AmoebaError.exit_code`.
"""

from __future__ import annotations


class AmoebaError(Exception):
    """Base class: a problem the user can fix. The message names the fix."""

    exit_code = 2

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        self.fix = fix
        super().__init__(f"{message} ({fix})" if fix else message)


class UnsupportedArchitectureError(AmoebaError):
    """The model's architecture has no elastic implementation."""


class ShapeError(AmoebaError):
    """A requested depth/width/shape the plan or model cannot give."""


class CheckpointError(AmoebaError):
    """A missing, truncated or corrupt model, plan or training checkpoint."""


class OutputError(AmoebaError):
    """An output folder cannot be written (a parent that is a file, a read-only or full disk)."""


class OutputExistsError(OutputError):
    """The output folder exists and --force was not given."""


class ConfigError(AmoebaError):
    """A config or profile file with one or more invalid fields (all are listed)."""

    def __init__(self, what: str, problems: list[str], *, fix: str | None = None) -> None:
        self.problems = list(problems)
        joined = "; ".join(self.problems)
        super().__init__(f"{what}: {len(self.problems)} problem(s): {joined}", fix=fix)


class DataError(AmoebaError):
    """A bad or missing data file."""


class ResourceError(AmoebaError):
    """A shipped resource (default model, corpus, task) could not be fetched or read."""


class RuntimeMissingError(AmoebaError):
    """A backend's runtime package is not installed."""


class BackendError(AmoebaError):
    """An unknown backend, quant type or a failed export/load."""


class RuntimeCrashError(BackendError):
    """A backend's native runtime died by a signal (run in a child process, so only that call fails)."""

    exit_code = 4


class ValidationFailedError(AmoebaError):
    """An exported artifact failed one or more accuracy gates."""

    exit_code = 3


class BudgetError(AmoebaError):
    """No shape satisfies a device target's budgets."""
