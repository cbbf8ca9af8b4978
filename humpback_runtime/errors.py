"""The errors the stages raise and the exit codes runners tell apart.

At the bottom of the package: imports nothing from it, so every module may import it.
"""

# Exit codes of `humpback stage`: a stage that failed may succeed on retry; one whose inputs are
# missing will not; an invalid run file or command line never will.
EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_INPUTS_MISSING = 4
EXIT_LEASE_HELD = 5  # another process is writing the stage: try again later, or wait (--wait)
EXIT_INPUTS_DAMAGED = 6  # an input differs from its producer's manifest, which was withdrawn: run it again


class StageError(RuntimeError):
    """A stage cannot finish; the message says what to change."""

    exit_code = EXIT_FAILED


class InputsMissing(StageError):
    """A stage's inputs (the outputs of the stages it depends on) are not in the store."""

    exit_code = EXIT_INPUTS_MISSING


class InputsDamaged(StageError):
    """An input object differs from the manifest of the stage that wrote it (missing, another size,
    another checksum). That stage's manifest is withdrawn, so it runs again; then this one can."""

    exit_code = EXIT_INPUTS_DAMAGED


class LeaseHeld(StageError):
    """Another process holds the stage's lease (one writer per stage)."""

    exit_code = EXIT_LEASE_HELD


class LeaseLost(StageError):
    """This process lost the stage's lease (not renewed in time, or taken over) and stopped writing."""


class TrainingError(RuntimeError):
    """Training cannot start or finish; the message names the setting or input at fault."""
