"""Errors a user can act on, shared by every layer of the package."""


class ConfigError(ValueError):
    """A configuration value the user can fix; the message names the key and the fix."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that would run code when unpickled: refused before anything in it runs."""


class ImageLoadError(ValueError):
    """A file that is not a readable image; the message names the file."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source, self.reason = source, reason

    def __reduce__(self) -> tuple:  # picklable, so it can cross a worker process boundary
        return (type(self), (self.source, self.reason))


class DataError(ValueError):
    """A dataset entry or annotation file that cannot be used; the message names the file (and
    line or key) and the fix."""


class TrainingError(RuntimeError):
    """Training that cannot go on (a non-finite loss or gradient); the message names the step,
    the batch and what to do."""


class Preempted(TrainingError):
    """Training stopped by SIGTERM, what a scheduler sends before pre-empting a job; the
    message says what was saved and how to resume."""

    exit_status = 143  # 128 + SIGTERM: what a shell reports for a process it terminated


def first_line(err: BaseException, with_type: bool = False) -> str:
    """An error as one line: its message's first non-blank line (after its type's name, with
    `with_type`), or the type's name alone when the message is empty, so that a library's
    multi-line message never floods a one-line report."""
    line = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    if not line:
        return type(err).__name__
    return f"{type(err).__name__}: {line}" if with_type else line
