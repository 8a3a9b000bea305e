"""The project's error types: what the CLI turns into one line and an exit code."""


class UserError(Exception):
    """Bad input (recipe, data, paths, unsupported combination): one line, exit code 2, nothing written."""

    exit_code = 2


class NothingToDo(Exception):
    """The command's work is already done (a finished run resumed): the message says so, exit code 0, nothing
    written."""

    exit_code = 0


class TrainingStopped(Exception):
    """Training ended before its last step for a reason that is not bad input; each kind has its exit code."""

    exit_code = 1


class TrainingInterrupted(TrainingStopped):
    """SIGTERM/SIGINT: the current step finished and a checkpoint was committed; `--resume` continues."""

    exit_code = 3


class TrainingDiverged(TrainingStopped):
    """The loss became NaN/inf: stopped within the step, the last good checkpoint is kept."""

    exit_code = 4


class TrainingOutOfMemory(TrainingStopped):
    """The accelerator ran out of memory; nothing partial was committed."""

    exit_code = 5
