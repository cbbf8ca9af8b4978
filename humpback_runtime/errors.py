"""The errors the stages raise and the exit codes runners tell apart.

At the bottom of the package: imports nothing from it, so every module may import it.
"""

# Exit codes of `humpback stage`: a stage that failed may succeed on retry; one whose inputs are
# missing will not; an invalid run file or command line never will.
EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_INPUTS_MISSING = 4


class StageError(RuntimeError):
    """A stage cannot finish; the message says what to change."""

    exit_code = EXIT_FAILED


class InputsMissing(StageError):
    """A stage's inputs (the outputs of the stages it depends on) are not in the store."""

    exit_code = EXIT_INPUTS_MISSING


class TrainingError(RuntimeError):
    """Training cannot start or finish; the message names the setting or input at fault."""
