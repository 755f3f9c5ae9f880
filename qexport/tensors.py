"""Large initializers as external-data stubs: serialize a model's graph without copying its weights.

A leaf module (onnx_ir and numpy only) shared by the IR helpers (``trial_copy``), the ONNX Runtime sessions
(``serialize_without_weights``) and the streamed save: the one definition of which tensor types a numpy array
holds byte for byte, and of the swap of each large initializer for a stub that is put back afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import onnx_ir as ir

# Types whose ONNX raw data is the numpy array's own bytes (on little-endian hosts).
NUMPY_NATIVE = frozenset({
    ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.INT8, ir.DataType.UINT8,
    ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32, ir.DataType.UINT32, ir.DataType.INT64,
    ir.DataType.UINT64, ir.DataType.BOOL,
})
MIN_ELEMENTS = 1024  # smaller initializers stay inline


@contextlib.contextmanager
def weights_as_stubs(model: ir.Model, location: str, min_elements: int = MIN_ELEMENTS,
                     keep_inputs: bool = False) -> Iterator[dict[str, ir.TensorProtocol]]:
    """While the block runs, each initializer of a numpy-native type with at least ``min_elements`` elements is an
    ``ir.ExternalTensor`` stub naming ``location`` (nothing reads it); yields {name: the real tensor}, in graph
    order, and puts the real tensors back on exit. ``keep_inputs``: initializers that are also graph inputs (a
    feed may override them) stay inline."""
    swapped: dict[str, ir.TensorProtocol] = {}
    try:
        for name, value in model.graph.initializers.items():
            tensor = value.const_value
            if (tensor is None or tensor.dtype not in NUMPY_NATIVE or tensor.size < min_elements
                    or (keep_inputs and value.is_graph_input())):
                continue
            swapped[name] = tensor
            value.const_value = ir.ExternalTensor(location, offset=0, length=tensor.nbytes, dtype=tensor.dtype,
                                                  shape=tensor.shape, name=name, base_dir="")
        yield swapped
    finally:
        for name, tensor in swapped.items():
            model.graph.initializers[name].const_value = tensor
