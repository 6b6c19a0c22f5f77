"""Every error class threepc raises has a gRPC status (the one mapping in server/status.py)."""

import inspect

import grpc

from threepc.common import errors
from threepc.server.status import STATUS, status_of


def test_every_error_class_has_a_status() -> None:
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.ThreePCError)]
    assert len(classes) >= 8
    missing = [c.__name__ for c in classes if c not in STATUS]
    assert missing == []


def test_specific_codes() -> None:
    assert status_of(errors.DecodeError("x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(errors.AuthError("x")) == grpc.StatusCode.UNAUTHENTICATED
    assert status_of(errors.MismatchError("x")) == grpc.StatusCode.FAILED_PRECONDITION
