"""User-facing errors: one line that names the problem and the fix, shown without a traceback."""


class SafePatchingError(Exception):
    """An error caused by input or environment, not by a bug in safepatching."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem if problem.endswith((".", "?", "!")) else problem + "."
        self.fix = fix
        super().__init__(f"{self.problem} Fix: {fix}" if fix else self.problem)


class ConfigError(SafePatchingError):
    """A configuration file, flag or value is invalid."""


class DataError(SafePatchingError):
    """A dataset cannot be read or does not have the expected shape."""


class ModelError(SafePatchingError):
    """A model cannot be found, fetched, verified or loaded."""


class TrainingError(SafePatchingError):
    """Patch derivation cannot continue (for example a non-finite loss)."""
