"""Read a checkpoint one tensor at a time, by its Hugging Face name, without loading the model.

The layer-wise export traces a few layers and stamps the rest (:mod:`qexport.exporter.layerwise`); the stamped
layers' weights are read from here when the graph needs their values (saving, calibration), one tensor at a
time, so the whole model is never held in memory at once.

* :class:`SafetensorsCheckpoint`: a folder saved with ``save_pretrained`` (one ``model.safetensors`` or shards
  listed in ``model.safetensors.index.json``); each read opens the file memory-mapped and copies one tensor out.
* :class:`GGUFCheckpoint`: a GGUF file. Its tensor table is parsed here (the file's metadata values are skipped,
  not decoded); a read dequantizes one tensor from the memory-mapped file with the ``gguf`` package and applies
  transformers' own name map and per-architecture fix-ups (for example Llama's q/k row order, Gemma's norm
  offset), the same ones ``from_pretrained(gguf_file=...)`` applies to the whole file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class CheckpointError(RuntimeError):
    """The checkpoint cannot be read tensor by tensor; the caller loads the whole model instead."""


class Checkpoint(Protocol):
    """Tensors by Hugging Face name: their shapes from the file's table, their values read one at a time."""

    def __contains__(self, name: str) -> bool: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def load(self, name: str) -> np.ndarray:
        """The tensor as a float32 array in the model's layout."""
        ...


class SafetensorsCheckpoint:
    """The ``*.safetensors`` files of a folder saved with ``save_pretrained``."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index.is_file():
            files = sorted({folder / file for file in json.loads(index.read_text())["weight_map"].values()})
        elif single.is_file():
            files = [single]
        else:
            raise CheckpointError(f"{folder} has no model.safetensors (nor an index of shards)")
        self._files: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for path in files:  # each file's header once: names and shapes
            self._add(path)

    def _add(self, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                self._files[name] = path
                self._shapes[name] = tuple(handle.get_slice(name).get_shape())

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def load(self, name: str) -> np.ndarray:
        import torch
        from safetensors import safe_open

        with safe_open(str(self._files[name]), framework="pt") as handle:
            tensor = handle.get_tensor(name)
        return tensor.to(torch.float32).numpy()


# GGUF metadata value types (the GGUF specification's gguf_metadata_value_type) and their fixed sizes.
_STRING, _ARRAY = 8, 9
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


class _Cursor:
    def __init__(self, data: memoryview) -> None:
        self.data, self.pos = data, 0

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from("<" + fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize("<" + fmt)
        return value

    def string(self) -> str:
        length = self.unpack("Q")
        text = bytes(self.data[self.pos:self.pos + length]).decode("utf-8", errors="replace")
        self.pos += length
        return text

    def skip_string(self) -> None:
        length = self.unpack("Q")  # read before pos is: ``self.pos += self.unpack(...)`` would lose the 8 bytes
        self.pos += length

    def value(self, kind: int, keep: bool) -> Any:
        if kind == _STRING:
            return self.string() if keep else self.skip_string()
        if kind == _ARRAY:
            item, count = self.unpack("I"), self.unpack("Q")
            if item == _STRING:
                for _ in range(count):
                    self.skip_string()
            elif item in _SCALAR:
                self.pos += struct.calcsize("<" + _SCALAR[item]) * count
            else:
                for _ in range(count):
                    self.value(item, False)
            return None
        if kind not in _SCALAR:
            raise CheckpointError(f"unknown GGUF metadata type {kind}")
        return self.unpack(_SCALAR[kind])


def read_gguf_table(path: str | Path) -> tuple[dict[str, Any], dict[str, tuple[int, tuple[int, ...], int]]]:
    """(the file's scalar and string metadata, {GGUF tensor name: (ggml type, numpy shape, absolute offset)})."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cursor = _Cursor(memoryview(data))
    if bytes(data[:4]) != b"GGUF":
        raise CheckpointError(f"{path} is not a GGUF file")
    cursor.pos = 4
    version = cursor.unpack("I")
    if version < 2:
        raise CheckpointError(f"GGUF version {version} is not supported (2 or later)")
    tensors, fields = cursor.unpack("Q"), cursor.unpack("Q")
    meta: dict[str, Any] = {}
    for _ in range(fields):
        key, kind = cursor.string(), cursor.unpack("I")
        value = cursor.value(kind, keep=True)
        if value is not None:
            meta[key] = value
    table: dict[str, tuple[int, tuple[int, ...], int]] = {}
    for _ in range(tensors):
        name, dims = cursor.string(), cursor.unpack("I")
        shape = tuple(cursor.unpack("Q") for _ in range(dims))
        kind, offset = cursor.unpack("I"), cursor.unpack("Q")
        table[name] = (kind, tuple(reversed(shape)), offset)
    alignment = int(meta.get("general.alignment", 32))
    start = -(-cursor.pos // alignment) * alignment
    return meta, {name: (kind, shape, start + offset) for name, (kind, shape, offset) in table.items()}


class GGUFCheckpoint:
    """A GGUF file, read with transformers' name map and tensor fix-ups for its architecture."""

    def __init__(self, path: str | Path, config, names) -> None:
        """``names``: the Hugging Face state-dict names of the model built from ``config``."""
        from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        self._path = str(path)
        meta, self._table = read_gguf_table(path)
        architecture = meta.get("general.architecture")
        arch = next((key for key, value in MODEL_ARCH_NAMES.items() if value == architecture), None)
        if arch is None:
            raise CheckpointError(f"{path}: GGUF architecture {architecture!r} is unknown to the gguf package")
        self._processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
        name_map = get_tensor_name_map(arch, config.get_text_config().num_hidden_layers)
        self._gguf_name: dict[str, str] = {}
        for hf_name in names:  # transformers' get_gguf_hf_weights_map, without its walk over every submodule
            stem, dot, suffix = self._processor.preprocess_name(hf_name).rpartition(".")
            gguf_stem = name_map.get_name(stem) if suffix in ("weight", "bias") else None
            if gguf_stem is not None and f"{gguf_stem}.{suffix}" in self._table:
                self._gguf_name[hf_name] = f"{gguf_stem}.{suffix}"
        self._key_map = {gguf: hf for hf, gguf in self._gguf_name.items()}
        self._data: np.memmap | None = None

    def __contains__(self, name: str) -> bool:
        return name in self._gguf_name

    def shape(self, name: str) -> tuple[int, ...]:
        return self._table[self._gguf_name[name]][1]

    def load(self, name: str) -> np.ndarray:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize, quant_shape_to_byte_shape

        gguf_name = self._gguf_name[name]
        kind, shape, offset = self._table[gguf_name]
        qtype = GGMLQuantizationType(kind)
        block, type_size = GGML_QUANT_SIZES[qtype]
        count = int(np.prod(shape)) * type_size // block
        if self._data is None:
            self._data = np.memmap(self._path, dtype=np.uint8, mode="r")
        raw = self._data[offset:offset + count]
        if qtype == GGMLQuantizationType.F32:
            weights = raw.view(np.float32).reshape(shape)
        elif qtype == GGMLQuantizationType.F16:
            weights = raw.view(np.float16).reshape(shape)
        else:
            weights = dequantize(raw.reshape(quant_shape_to_byte_shape(shape, qtype)), qtype)
        result = self._processor.process(weights=weights, name=gguf_name, tensor_key_mapping=self._key_map,
                                         parsed_parameters={"config": self._processor.config, "tensors": {}})
        if result.name != gguf_name:
            raise CheckpointError(f"GGUF tensor {gguf_name} is renamed by its processor; not read tensor by tensor")
        return np.array(result.weights, dtype=np.float32, order="C")
