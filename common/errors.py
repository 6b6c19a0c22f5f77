"""Every error threepc raises on purpose, in one tree.

    ThreePCError
    ├── ConfigError          a run's config is invalid (unknown field, bad value)
    │   └── CheckpointError  a checkpoint is missing, damaged, or not of this run
    ├── DataError            a data set cannot be found, read or split as asked
    ├── DecodeError          a message from the wire is malformed or inconsistent
    │   └── RefusedUpdate    a well-formed update would make the aggregate non-finite
    ├── ProtocolError        a peer broke the round protocol (wrong round, unknown worker, ...)
    │   ├── SlotTakenError   the worker id asked for is held by another stream (retry later)
    │   └── DeadlineError    a peer did not send what the protocol expects in time (Join, Ready)
    ├── AuthError            a peer failed authentication (missing or wrong join token)
    ├── MismatchError        a worker's data does not fit the run (dimension, rows)
    ├── TransportError       the other end cannot be reached or went away
    ├── OutputError          a run's folder cannot be used: it holds a run, or cannot be written
    ├── DivergedError        the iterate stopped being finite (stepsize too large)
    │   └── WorkerDivergedError  a worker's own gradient, loss or update stopped being finite
    └── RunFinishedError     a worker joined a run that has already finished

Each maps to one gRPC status code in `threepc.server.status` (a test checks that every class
has one), and to a one-line message and a non-zero exit code in the CLI.
"""


class ThreePCError(Exception):
    """Base class: an error with a message a user can act on."""


class ConfigError(ThreePCError):
    """A run's config is invalid."""


class CheckpointError(ConfigError):
    """A checkpoint is missing, damaged, or was not written for this run; it names the file."""


class OutputError(ThreePCError):
    """A run's folder cannot be used as asked: it holds another run, or it cannot be written."""


class DataError(ThreePCError):
    """A data set cannot be found, read or split as asked."""


class DecodeError(ThreePCError):
    """A message from the wire is malformed; it names the field that was wrong."""


class RefusedUpdate(DecodeError):
    """A worker's update is well-formed, but applying it would make a mirror or their sum
    non-finite (float32 state overflowing, two parts of 1.7e308): refused before any state
    changed, counted as refused, and the worker is absent for the round."""


class ProtocolError(ThreePCError):
    """A peer broke the round protocol."""


class SlotTakenError(ProtocolError):
    """The worker id asked for (or every id) is held by another stream; it may free up (a peer that
    never gets ready loses its slot at the Ready deadline), so a worker retries."""


class DeadlineError(ProtocolError):
    """A peer did not send what the protocol expects next (its Join, its Ready) in time."""


class AuthError(ThreePCError):
    """A peer failed authentication."""


class MismatchError(ThreePCError):
    """A worker's data does not fit the run."""


class TransportError(ThreePCError):
    """The other end cannot be reached or went away."""


class DivergedError(ThreePCError, ArithmeticError):
    """The iterate stopped being finite: the stepsize is too large for this run."""


class WorkerDivergedError(DivergedError):
    """Worker `worker_id`'s `what` ("gradient", "loss" or "update") at round `round` is not finite:
    the same line in process and over gRPC (where the worker says so with a Diverged message)."""

    def __init__(self, round: int, worker_id: int, what: str):
        self.round, self.worker_id, self.what = round, worker_id, what
        super().__init__(f"the run diverged at round {round}: worker {worker_id}'s {what} is not finite")


class RunFinishedError(ThreePCError):
    """A worker joined a run that has already finished (nothing is wrong; there is no work)."""
