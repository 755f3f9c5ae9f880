"""Write an ONNX model to one protobuf file one initializer at a time.

``ir.save`` builds the whole ModelProto (a copy of every weight) and then its serialized bytes (a second copy)
before it writes, so saving a model in one file peaks at about three times its weights. Here the model is
serialized with every initializer's data left out, and the initializers are appended one by one, each as a
further occurrence of ``ModelProto.graph`` holding only that initializer. Protobuf parsers merge repeated
occurrences of a message field (repeated fields concatenate, in order), so the file parses to exactly the
ModelProto that ``ir.save`` writes; only the order of the fields in the bytes differs. Peak memory is the largest
tensor's proto (in-memory float and integer tensors are written straight from their arrays), on top of the
model itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from qexport.tensors import NUMPY_NATIVE

_MODEL_GRAPH_FIELD = 7  # ModelProto.graph
_GRAPH_INITIALIZER_FIELD = 5  # GraphProto.initializer
_TENSOR_RAW_DATA_FIELD = 9  # TensorProto.raw_data
_LENGTH_DELIMITED = 2
_PLACEHOLDER = "qexport-placeholder"


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        byte, number = number & 0x7F, number >> 7
        out.append(byte | (0x80 if number else 0))
        if not number:
            return bytes(out)


def _key(number: int, length: int) -> bytes:
    """The key and length that open a length-delimited field of ``length`` bytes."""
    return _varint(number << 3 | _LENGTH_DELIMITED) + _varint(length)


def write_single_file(model: ir.Model, path: str | os.PathLike) -> None:
    """Save ``model`` as one ``.onnx`` file (initializers inline), writing one initializer's bytes at a time.

    The model is left as it was. Sub-graph initializers (rare and small) are written inline with their graph.
    The caller keeps the file under protobuf's 2 GB limit (larger models take external data).
    """
    values = [v for v in model.graph.initializers.values() if v.const_value is not None]
    tensors = [v.const_value for v in values]
    try:  # the skeleton: every top-level initializer as a data-less placeholder, so nothing large is copied
        for value, tensor in zip(values, tensors):
            value.const_value = ir.ExternalTensor(_PLACEHOLDER, 0, tensor.nbytes, tensor.dtype, shape=tensor.shape,
                                                  name=value.name)
        proto = ir.serde.serialize_model(model)
    finally:
        for value, tensor in zip(values, tensors):
            value.const_value = tensor
    del proto.graph.initializer[:]
    graph = proto.graph.SerializeToString()
    proto.ClearField("graph")
    path = Path(path)
    with open(path, "wb") as handle:
        handle.write(proto.SerializeToString())
        handle.write(_key(_MODEL_GRAPH_FIELD, len(graph)) + graph)
        for value, tensor in zip(values, tensors):
            head, data = _tensor_parts(value.name, tensor)
            inner = _key(_GRAPH_INITIALIZER_FIELD, len(head) + len(data))
            handle.write(_key(_MODEL_GRAPH_FIELD, len(inner) + len(head) + len(data)) + inner + head)
            handle.write(data)


def _tensor_parts(name: str, tensor: ir.TensorProtocol) -> tuple[bytes, memoryview | bytes]:
    """A TensorProto's bytes as (everything but the data, the data field): what ``serialize_tensor`` writes, with
    a plain in-memory tensor's raw data taken from its array where that needs no conversion."""
    array = None
    if isinstance(tensor, ir.LazyTensor):  # read from the checkpoint now, dropped once written
        tensor = tensor.raw()
    if isinstance(tensor, ir.Tensor) and tensor.dtype in NUMPY_NATIVE and np.little_endian:  # not external, not strings
        array = np.ascontiguousarray(tensor.numpy())  # a copy only where the array is a strided view
    if array is None or array.dtype.itemsize * array.size != tensor.nbytes:
        proto = ir.serde.serialize_tensor(tensor)
        proto.name = name
        return proto.SerializeToString(), b""
    proto = onnx.TensorProto(name=name, data_type=tensor.dtype.value, dims=tensor.shape.numpy())
    if tensor.doc_string:
        proto.doc_string = tensor.doc_string
    for key, text in tensor.metadata_props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, text
    raw = memoryview(array.reshape(-1)).cast("B")
    return proto.SerializeToString() + _key(_TENSOR_RAW_DATA_FIELD, len(raw)), raw
