"""TensorRT engines for exported causal LMs: build one from the (Q/DQ) ONNX graph, and run it as a Runner.

Written against TensorRT 10's documented Python API (``Builder``, ``OnnxParser``, ``IBuilderConfig``, optimization
profiles, ``build_serialized_network``, ``Runtime``/``ICudaEngine``/``IExecutionContext`` with ``set_input_shape``,
``set_tensor_address`` and ``execute_async_v3``). ``tensorrt`` is imported only when a build or a run needs it.

Explicit quantization: the Q/DQ nodes in the graph decide what runs in INT8/FP8/INT4. The network is strongly typed
(TensorRT's advice for Q/DQ models: no precision flags); ``fp16=True`` asks for the weakly typed mode instead, where
the FP16 (and INT8) builder flags let TensorRT run the float layers of an FP32 export in half precision.

Two optimization profiles: 0 = prefill (past length 0, sequence 1..max_seq_len) and 1 = decode (sequence 1, past
0..max_seq_len-1). The runner picks the first profile whose ranges hold the inputs' shapes. An empty past
(``[batch, heads, 0, head_dim]``) is a valid TensorRT tensor; it is still given a one-element buffer so its address
is never null.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx_ir as ir

from qexport.errors import QexportError
from qexport.runtimes.base import SessionRunner
from qexport.runtimes.tensorrt.check import TensorRTTarget, format_findings, require_compatible

log = logging.getLogger(__name__)

ENGINE_FILE = "model.engine"
INSTALL_HINT = "pip install qexport[tensorrt] on a machine with an NVIDIA GPU and access to NVIDIA's package index"
Range = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or a clear :class:`QexportError` saying how to get it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise QexportError(f"TensorRT is not installed here ({exc}); {INSTALL_HINT}") from exc
    return tensorrt


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """How an engine is built; saved next to it as JSON."""

    int8: bool = True
    fp16: bool = False
    workspace_mb: int = 4096
    max_seq_len: int = 2048
    max_batch: int = 1
    opt_seq_len: int | None = None  # kernels are tuned for this prompt length (default: min(128, max_seq_len))

    def __post_init__(self) -> None:
        if self.workspace_mb <= 0 or self.max_seq_len < 2 or self.max_batch < 1:
            raise QexportError(f"invalid engine settings {self}: workspace > 0, max_seq_len >= 2, max_batch >= 1")
        if self.opt_seq_len is not None and not 1 <= self.opt_seq_len <= self.max_seq_len:
            raise QexportError(f"opt_seq_len {self.opt_seq_len} must lie in 1..{self.max_seq_len}")

    @property
    def opt_seq(self) -> int:
        return self.opt_seq_len or min(128, self.max_seq_len)


def profile_shapes(inputs: Mapping[str, tuple[int | str | None, ...]], settings: EngineSettings) -> list[dict[str, Range]]:
    """(min, opt, max) shapes of each input for the prefill (0) and decode (1) profiles.

    ``inputs`` maps input names to their ONNX shapes; the static dimensions of the past key/values (heads,
    head size) are kept, batch / sequence / past / total lengths get the profile's ranges.
    """
    batch = (1, 1, settings.max_batch)
    length = settings.max_seq_len
    prefill = {"seq": (1, settings.opt_seq, length), "past": (0, 0, 0), "total": (1, settings.opt_seq, length)}
    decode = {"seq": (1, 1, 1), "past": (0, settings.opt_seq, length - 1), "total": (1, settings.opt_seq + 1, length)}
    profiles = []
    for lengths in (prefill, decode):
        shapes: dict[str, Range] = {}
        for name, dims in inputs.items():
            if name in ("input_ids", "position_ids"):
                layout = [batch, lengths["seq"]]
            elif name == "attention_mask":
                layout = [batch, lengths["total"]]
            elif name.startswith("past_key_values.") and len(dims) == 4 and all(isinstance(d, int) for d in dims[1::2]):
                layout = [batch, (dims[1],) * 3, lengths["past"], (dims[3],) * 3]
            else:
                raise QexportError(f"input {name!r} {list(dims)} is not part of the exported causal-LM signature; "
                                   "TensorRT profiles are defined only for input_ids, attention_mask, position_ids "
                                   "and past_key_values.*")
            shapes[name] = tuple(tuple(int(dim[i]) for dim in layout) for i in range(3))  # type: ignore[assignment]
        profiles.append(shapes)
    return profiles


def model_input_shapes(model: ir.Model) -> dict[str, tuple[int | str | None, ...]]:
    return {v.name: tuple(v.shape.dims) if v.shape is not None else () for v in model.graph.inputs}


def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    *,
    int8: bool = True,
    fp16: bool = False,
    workspace_mb: int = 4096,
    max_seq_len: int = 2048,
    max_batch: int = 1,
    opt_seq_len: int | None = None,
    target: TensorRTTarget = TensorRTTarget(),
) -> Path:
    """Check the model against TensorRT's rules (refusing with the findings), build, save engine + JSON settings."""
    settings = EngineSettings(int8, fp16, workspace_mb, max_seq_len, max_batch, opt_seq_len)
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    model = ir.load(onnx_path)
    warnings = require_compatible(model, target)
    if warnings:
        log.warning("TensorRT placement advice:\n%s", format_findings(warnings))
    has_qdq = any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in ir.traversal.RecursiveGraphIterator(model.graph))
    if has_qdq and not int8:
        raise QexportError("the model has Q/DQ nodes, which TensorRT always honours (explicit quantization); "
                           "build with --int8, or export without a quantization recipe")
    if int8 and not has_qdq:
        log.warning("%s has no Q/DQ nodes: the engine runs in floating point", onnx_path)
    profiles = profile_shapes(model_input_shapes(model), settings)
    del model

    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = not settings.fp16
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        messages = "\n".join(f"  {parser.get_error(i)}" for i in range(parser.num_errors))
        raise QexportError(f"TensorRT's ONNX parser refused {onnx_path}:\n{messages}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    if settings.fp16:
        if not hasattr(trt.BuilderFlag, "FP16"):
            raise QexportError(f"TensorRT {trt.__version__} builds strongly typed networks only; export with "
                               "--dtype fp16 and build without --fp16")
        config.set_flag(trt.BuilderFlag.FP16)
        if settings.int8:
            config.set_flag(trt.BuilderFlag.INT8)
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    log.info("building a TensorRT %s engine from %s (this takes minutes)", trt.__version__, onnx_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise QexportError("TensorRT could not build the engine; its log above says why")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    with open(engine_path, "wb") as f:
        f.write(serialized)
    record = {"settings": dataclasses.asdict(settings), "tensorrt": trt.__version__, "onnx": os.fspath(onnx_path),
              "strongly_typed": strongly_typed, "explicit_quantization": has_qdq,
              "profiles": {kind: {n: [list(s) for s in r] for n, r in p.items()}
                           for kind, p in zip(("prefill", "decode"), profiles)},
              "warnings": [w.to_json() for w in warnings]}
    settings_path(engine_path).write_text(json.dumps(record, indent=2))
    log.info("saved %s (%.1f MiB)", engine_path, engine_path.stat().st_size / 2**20)
    return engine_path


def settings_path(engine_path: str | os.PathLike) -> Path:
    return Path(engine_path).with_suffix(".json")


def _cuda_torch() -> Any:
    import torch

    if not torch.cuda.is_available():
        raise QexportError("the TensorRT runtime needs a CUDA GPU, and PyTorch sees none here; run on a GPU machine "
                           "or use --runtime ort-cpu")
    return torch


class TensorRTRunner(SessionRunner):
    """A serialized TensorRT engine behind the :class:`~qexport.runtimes.base.Runner` interface (torch CUDA buffers)."""

    def __init__(self, engine_path: str | os.PathLike, device: int = 0) -> None:
        trt, torch = import_tensorrt(), _cuda_torch()
        self._trt, self._torch = trt, torch
        self.name = "tensorrt"
        self.device = torch.device("cuda", device)
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise QexportError(f"TensorRT could not load {engine_path} (built by another TensorRT version or for "
                               "another GPU?); rebuild it with qexport build-engine")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.profiles = [{n: tuple(tuple(s) for s in self.engine.get_tensor_profile_shape(n, p)) for n in self._inputs}
                         for p in range(self.engine.num_optimization_profiles)]
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        self._stream = torch.cuda.Stream(self.device)
        self._active: int | None = None

    def select_profile(self, shapes: Mapping[str, tuple[int, ...]]) -> int:
        """The first optimization profile whose (min, max) ranges hold every input shape."""
        for index, ranges in enumerate(self.profiles):
            if all(len(shapes[n]) == len(low) and all(lo <= d <= hi for lo, d, hi in zip(low, shapes[n], high))
                   for n, (low, _, high) in ranges.items()):
                return index
        raise QexportError(f"no optimization profile of this engine holds the input shapes "
                           f"{ {n: list(s) for n, s in shapes.items()} }; rebuild with a larger --max-seq-len or "
                           f"--max-batch (profiles: {self.profiles})")

    def _buffer(self, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        """A CUDA tensor of ``shape``; empty tensors get one element so their address is not null."""
        torch_dtype = self._torch.from_numpy(np.empty(0, dtype)).dtype
        return self._torch.empty(max(math.prod(shape), 1), dtype=torch_dtype, device=self.device)

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = set(self._inputs) - set(feeds)
        if missing:
            raise QexportError(f"missing inputs for {self.name}: {sorted(missing)}")
        arrays = {n: np.ascontiguousarray(feeds[n], dtype=self._dtypes[n]) for n in self._inputs}
        profile = self.select_profile({n: a.shape for n, a in arrays.items()})
        torch, stream = self._torch, self._stream
        buffers: dict[str, Any] = {}
        with torch.cuda.stream(stream):
            if profile != self._active:
                self.context.set_optimization_profile_async(profile, stream.cuda_stream)
                self._active = profile
            for name, array in arrays.items():
                buffers[name] = self._buffer(array.shape, array.dtype)
                if array.size:
                    buffers[name].copy_(torch.from_numpy(array).reshape(-1), non_blocking=False)
                if not self.context.set_input_shape(name, array.shape):
                    raise QexportError(f"TensorRT refused shape {array.shape} for input {name!r}")
                self.context.set_tensor_address(name, buffers[name].data_ptr())
            shapes = {n: tuple(self.context.get_tensor_shape(n)) for n in self._outputs}
            for name, shape in shapes.items():
                buffers[name] = self._buffer(shape, self._dtypes[name])
                self.context.set_tensor_address(name, buffers[name].data_ptr())
            if not self.context.execute_async_v3(stream.cuda_stream):
                raise QexportError("TensorRT execution failed; its log above says why")
        stream.synchronize()
        return {n: buffers[n][: math.prod(s)].cpu().numpy().reshape(s) for n, s in shapes.items()}
