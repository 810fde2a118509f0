"""Precise gRPC errors: INVALID_ARGUMENT with google.rpc.BadRequest, RESOURCE_EXHAUSTED with RetryInfo."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status


class CheckpointError(ValueError):
    """A checkpoint the mesh cannot serve; the message says what is wrong with it."""


class RequestError(Exception):
    """Raised inside handlers; turned into a rich gRPC status at the service boundary."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status


def _pack(message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def invalid_argument(field: str, reason: str) -> RequestError:
    details = error_details_pb2.BadRequest(
        field_violations=[error_details_pb2.BadRequest.FieldViolation(field=field, description=reason)]
    )
    return RequestError(
        status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=f"{field}: {reason}", details=[_pack(details)])
    )


def resource_exhausted(reason: str, retry_after_s: float) -> RequestError:
    seconds = int(retry_after_s)
    delay = duration_pb2.Duration(seconds=seconds, nanos=int((retry_after_s - seconds) * 1e9))
    return RequestError(
        status_pb2.Status(
            code=code_pb2.RESOURCE_EXHAUSTED,
            message=f"{reason}; retry after {retry_after_s:.1f} s",
            details=[_pack(error_details_pb2.RetryInfo(retry_delay=delay))],
        )
    )


def unavailable(reason: str) -> RequestError:
    return RequestError(status_pb2.Status(code=code_pb2.UNAVAILABLE, message=reason))


def status_error(code: int, reason: str) -> RequestError:
    """Any other status (a google.rpc.Code), with its reason: NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, ..."""
    return RequestError(status_pb2.Status(code=code, message=reason))


async def abort(context: grpc.aio.ServicerContext, error: RequestError) -> None:
    await context.abort_with_status(rpc_status.to_status(error.status))


def from_rpc_error(err: grpc.aio.AioRpcError, hop: str) -> RequestError:
    """Carry a downstream service's status (and its details) back to our caller unchanged in kind."""
    status = rpc_status.from_call(err)
    if status is None:
        code = err.code().value[0]
        message = err.details() or err.code().name
        if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
            code, message = code_pb2.UNAVAILABLE, f"{hop} failed: {message}"
        status = status_pb2.Status(code=code, message=message)
    return RequestError(status)


def bad_request_fields(status: status_pb2.Status) -> list[tuple[str, str]]:
    """(field, description) pairs of a status's BadRequest details (for clients and tests)."""
    out = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            detail.Unpack(br)
            out += [(v.field, v.description) for v in br.field_violations]
    return out
