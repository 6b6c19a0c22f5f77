"""The one place where threepc's errors become gRPC status codes."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from threepc.common import errors

STATUS: dict[type[errors.ThreePCError], grpc.StatusCode] = {
    errors.ThreePCError: grpc.StatusCode.UNKNOWN,
    errors.ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.CheckpointError: grpc.StatusCode.FAILED_PRECONDITION,  # never on the wire: the CLI's
    errors.OutputError: grpc.StatusCode.FAILED_PRECONDITION,  # one line before serving
    errors.DataError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.DecodeError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.RefusedUpdate: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ProtocolError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.SlotTakenError: grpc.StatusCode.ALREADY_EXISTS,  # the worker retries with backoff
    errors.DeadlineError: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.AuthError: grpc.StatusCode.UNAUTHENTICATED,
    errors.MismatchError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.TransportError: grpc.StatusCode.UNAVAILABLE,
    errors.DivergedError: grpc.StatusCode.ABORTED,
    errors.WorkerDivergedError: grpc.StatusCode.ABORTED,
    errors.RunFinishedError: grpc.StatusCode.OUT_OF_RANGE,  # a join past the run's last round
}


def status_of(error: errors.ThreePCError) -> grpc.StatusCode:
    """The status code of the most specific class of `error` that has one."""
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.UNKNOWN


@contextlib.asynccontextmanager
async def aborting_on_error(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
    """Turn a ThreePCError raised by a servicer into `context.abort(status, message)`."""
    try:
        yield
    except errors.ThreePCError as err:
        await context.abort(status_of(err), f"{type(err).__name__}: {err}")
