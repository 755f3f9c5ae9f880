"""ONNX Runtime CPU sessions on an in-memory onnx_ir model, without serializing its weights.

Serializing a model to protobuf copies every initializer, and the session
then parses and copies them again. Here the large initializers are serialized as external-data stubs and
handed to ONNX Runtime as OrtValues on the model's own arrays (``SessionOptions.add_external_initializers``),
so only the graph structure is serialized. The model keeps its values; a large initializer that is not
page-aligned is swapped for an aligned copy once (see ``serialize_without_weights``).
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx_ir as ir

from qexport.tensors import MIN_ELEMENTS, NUMPY_NATIVE, weights_as_stubs

IN_MEMORY = "qexport-in-memory"  # the external-data location of the stubs; ONNX Runtime never opens it
PAGE = 4096  # initializer buffers start on a page boundary (see serialize_without_weights)
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})  # /proc/cpuinfo names of u8 x s8 dot products


def page_aligned(array: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``array`` (which may be a strided view) in a buffer that starts on a page boundary."""
    buffer = np.empty(array.nbytes + PAGE, dtype=np.uint8)
    start = (-buffer.ctypes.data) % PAGE
    out = buffer[start:start + array.nbytes].view(array.dtype).reshape(array.shape)
    np.copyto(out, array)
    return out


def _stable_buffer(tensor: ir.TensorProtocol) -> bool:
    """Whether ``tensor.numpy()`` returns the same buffer on every call: an ``ir.Tensor`` on a numpy array, or an
    ``ir.ExternalTensor`` (memory-mapped once). A tensor read from a protobuf is not: each call copies its bytes
    to a new address, so whether it is page-aligned is chance, and the array handed to ONNX Runtime is yet
    another copy."""
    if isinstance(tensor, ir.ExternalTensor):
        return True
    return isinstance(tensor, ir.Tensor) and isinstance(tensor.raw, np.ndarray)


def serialize_without_weights(model: ir.Model) -> tuple[bytes, list[str], list[np.ndarray]]:
    """(the model's bytes with its large initializers as external stubs, their names, their arrays).

    ONNX Runtime 1.32 uses a CPU buffer handed to it in place only when the buffer starts on a page boundary;
    otherwise every session copies it (measured: a session on SmolLM2-135M took about the size of its weights
    more). So a large initializer whose array is not page-aligned is replaced, in ``model``, by an equal tensor
    on a page-aligned copy: the values are unchanged, and later sessions on the model copy nothing."""
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if (tensor is None or tensor.dtype not in NUMPY_NATIVE or tensor.size < MIN_ELEMENTS
                or value.is_graph_input()):
            continue
        array = tensor.numpy()
        if not _stable_buffer(tensor) or not array.flags.c_contiguous or array.ctypes.data % PAGE:
            # adopt a page-aligned copy (one copy, also of a strided view), so later sessions use it in place
            value.const_value = ir.Tensor(page_aligned(array), dtype=tensor.dtype, name=name,
                                          doc_string=tensor.doc_string, metadata_props=dict(tensor.metadata_props))
    with weights_as_stubs(model, IN_MEMORY, MIN_ELEMENTS, keep_inputs=True) as swapped:  # inputs: overridable
        data = ir.to_proto(model).SerializeToString()
    arrays = [tensor.numpy() for tensor in swapped.values()]
    return data, list(swapped), arrays


def cpu_session(model: ir.Model, threads: int | None = None, as_written: bool = False):
    """An ONNX Runtime CPU session on ``model`` as it is now (default graph optimizations; ``as_written``: see
    :func:`session_options`)."""
    data, names, arrays = serialize_without_weights(model)
    return session_from_bytes(data, threads, names, arrays, as_written)


def session_from_bytes(data: bytes, threads: int | None = None, names: Sequence[str] = (),
                       arrays: Sequence[np.ndarray] = (), as_written: bool = False):
    """An ONNX Runtime CPU session on the serialized model ``data``; the external-data stubs ``names`` are read
    from ``arrays``."""
    import onnxruntime as ort

    options = session_options(threads, as_written=as_written)
    values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]  # views of the arrays, not copies
    if names:
        options.add_external_initializers(list(names), values)
    session = new_session(data, options)
    session._qexport_weights = values  # ONNX Runtime may use these buffers for the session's whole life
    return session


@functools.cache
def u8s8_saturates() -> bool:
    """Whether this CPU is x86-64 without a u8 x s8 dot-product instruction (AVX-512 VNNI, AVX-VNNI, AMX), where
    ONNX Runtime's U8S8 integer kernel sums pairs of products in saturating 16-bit lanes. False where unknown."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), None)
    return flags is not None and not VNNI_FLAGS & set(flags)


def session_options(threads: int | None = None, inter_op_threads: int | None = None, as_written: bool = False):
    """The options of every qexport session: default graph optimizations, warnings off, ``threads`` intra-op.

    Where the U8S8 kernel saturates (:func:`u8s8_saturates`), ONNX Runtime's own fusion of QDQ nodes into
    integer kernels is turned off, so a QDQ graph (``w8a8-static``) runs as written, in float, rather than on a
    kernel that clips large products; qexport's own lowering (``ort-int8``) picks exact kernels itself.
    ``as_written`` turns that fusion off on every CPU: calibration sessions use it, because the fusion rewrites
    a 4-bit weight's DequantizeLinear and MatMul into MatMulNBits, which also rounds the activations to int8
    (accuracy level 4), so statistics taken through it would depend on the CPU and on ONNX Runtime's defaults.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if as_written or u8s8_saturates():
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if as_written:  # short-lived calibration sessions: no packed copy of every MatMul weight
        options.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        options.intra_op_num_threads = threads
        if inter_op_threads:
            options.inter_op_num_threads = inter_op_threads
    return options


def new_session(model: bytes | str, options, providers: Sequence[str] = ("CPUExecutionProvider",)):
    """An ONNX Runtime session on a serialized model or a model file: the one place qexport opens one."""
    import onnxruntime as ort

    return ort.InferenceSession(model, options, providers=list(providers))
