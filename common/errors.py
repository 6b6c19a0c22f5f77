"""Every error threepc raises on purpose, in one tree.

    ThreePCError
    ├── ConfigError          a run's config is invalid (unknown field, bad value)
    ├── DataError            a data set cannot be found, read or split as asked
    ├── DecodeError          a message from the wire is malformed or inconsistent
    │   └── RefusedUpdate    a well-formed update would make the aggregate non-finite
    ├── ProtocolError        a peer broke the round protocol (wrong round, unknown worker, ...)
    ├── AuthError            a peer failed authentication (missing or wrong join token)
    ├── MismatchError        a worker's data does not fit the run (dimension, rows)
    ├── TransportError       the other end cannot be reached or went away
    ├── DivergedError        the iterate stopped being finite (stepsize too large)
    └── RunFinishedError     a worker joined a run that has already finished

Each maps to one gRPC status code in `threepc.server.status` (a test checks that every class
has one), and to a one-line message and a non-zero exit code in the CLI.
"""


class ThreePCError(Exception):
    """Base class: an error with a message a user can act on."""


class ConfigError(ThreePCError):
    """A run's config is invalid."""


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


class AuthError(ThreePCError):
    """A peer failed authentication."""


class MismatchError(ThreePCError):
    """A worker's data does not fit the run."""


class TransportError(ThreePCError):
    """The other end cannot be reached or went away."""


class DivergedError(ThreePCError, ArithmeticError):
    """The iterate stopped being finite: the stepsize is too large for this run."""


class RunFinishedError(ThreePCError):
    """A worker joined a run that has already finished (nothing is wrong; there is no work)."""
