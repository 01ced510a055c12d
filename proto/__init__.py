"""The wire contract of step37-serve: messages, tensor codec, limits and errors.

Imports torch, numpy and msgpack only, so any service (and any client) can speak it.
"""

from proto.codec import (
    CONTENT_TYPE,
    MESSAGE_TYPES,
    SUPPORTED_VERSIONS,
    WIRE_VERSION,
    decode,
    encode,
    encode_chunks,
)
from proto.errors import (
    BadTensor,
    InvalidValue,
    LimitExceeded,
    MalformedMessage,
    MissingField,
    ProtocolError,
    UnknownMessageType,
    UnsupportedVersion,
    WrongType,
)
from proto.image_for_insert import ImageForInsert, feature_blocks, feature_nbytes
from proto.limits import DEFAULT_LIMITS, WireLimits
from proto.messages import (
    FEATURE_DTYPES,
    MAX_CACHE_SALT_LEN,
    EncodeRequest,
    EncodeResponse,
    GenerateRequest,
    GenerateResponse,
    SamplingParams,
    new_request_id,
)
from proto.tensor import (
    WIRE_DTYPES,
    DecodeBudget,
    dtype_from_name,
    dtype_name,
    tensor_from_wire,
    tensor_to_wire,
    to_device,
)

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_LIMITS",
    "FEATURE_DTYPES",
    "MAX_CACHE_SALT_LEN",
    "MESSAGE_TYPES",
    "SUPPORTED_VERSIONS",
    "WIRE_DTYPES",
    "WIRE_VERSION",
    "BadTensor",
    "DecodeBudget",
    "EncodeRequest",
    "EncodeResponse",
    "GenerateRequest",
    "GenerateResponse",
    "ImageForInsert",
    "InvalidValue",
    "LimitExceeded",
    "MalformedMessage",
    "MissingField",
    "ProtocolError",
    "SamplingParams",
    "UnknownMessageType",
    "UnsupportedVersion",
    "WireLimits",
    "WrongType",
    "decode",
    "dtype_from_name",
    "dtype_name",
    "encode",
    "encode_chunks",
    "feature_blocks",
    "feature_nbytes",
    "new_request_id",
    "tensor_from_wire",
    "tensor_to_wire",
    "to_device",
]
