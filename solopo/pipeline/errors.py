"""User-facing errors. Every message says what is wrong, where, and what to do."""

from __future__ import annotations


class SolopoError(Exception):
    """An error meant for the user; the CLI prints it without a traceback."""


class ConfigError(SolopoError):
    """One or more config problems, reported all at once."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        body = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} config problem(s){where}:\n{body}")


class DataError(SolopoError):
    """Bad input data: names the file, line and field, and what to do about it."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ):
        self.path, self.line, self.field, self.hint = path, line, field, hint
        loc = ""
        if path:
            loc = f"{path}"
            if line is not None:
                loc += f":{line}"
            loc += ": "
        fld = f"field '{field}': " if field else ""
        tail = f" ({hint})" if hint else ""
        super().__init__(f"{loc}{fld}{message}{tail}")


class MissingDependencyError(SolopoError):
    """An optional dependency is missing; names the install command."""

    def __init__(self, package: str, install: str, why: str = ""):
        self.package, self.install = package, install
        why = f" {why}" if why else ""
        super().__init__(f"'{package}' is not installed.{why} Install it with: {install}")


class RunDirError(SolopoError):
    """The run directory cannot be used: not a directory, not writable, full, or held by another run."""
