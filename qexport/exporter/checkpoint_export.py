"""Export straight from a checkpoint, without loading the model: a shallow model is built from the config with the
real weights of the few layers it traces, and every other layer is stamped with tensors read from the checkpoint
only when the graph needs their values (saving, calibration), one tensor at a time.

The graph is the one :func:`qexport.exporter.graph_export.export_graph` writes on the loaded model (same trace,
same stamping, same names); only where the weights live differs. The stamped layers' initializers are
``ir.LazyTensor`` objects: :func:`materialize` reads them all where passes will rewrite the weights.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Callable, Iterable

import numpy as np
import onnx_ir as ir
import torch

from qexport.exporter import layerwise
from qexport.exporter.checkpoint import Checkpoint, CheckpointError
from qexport.exporter.families import Family
from qexport.exporter.graph_export import (DTYPES, ExportPath, ExportSettings, _trace, finish_export,
                                           probe_signature)
from qexport.runtimes.signature import GraphSignature

log = logging.getLogger(__name__)

_IR_DTYPES = {torch.float32: ir.DataType.FLOAT, torch.float16: ir.DataType.FLOAT16}
_NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16}


def shallow_config(config, plan: layerwise.LayerPlan):
    """A copy of ``config`` whose decoder has only the plan's shallow layers (their kinds in order)."""
    reduced = copy.deepcopy(config)
    text = layerwise.text_config(reduced)
    text.num_hidden_layers = len(plan.shallow)
    if getattr(text, "layer_types", None):
        text.layer_types = list(plan.shallow_kinds)
    return reduced


class _Names:
    """Hugging Face names of the shallow model's tensors and of the real model's (the layer index mapped)."""

    def __init__(self, model: torch.nn.Module, plan: layerwise.LayerPlan) -> None:
        self.plan = plan
        self.prefix = ".".join(plan.path) + "."
        by_position: dict[int, list[str]] = {}
        self.other: list[str] = []
        for key in model.state_dict():
            position, suffix = self.split(key)
            if position is None:
                self.other.append(key)
            else:
                by_position.setdefault(position, []).append(suffix)
        self.suffixes = {kind: by_position.get(0 if kind is None else plan.template(kind), [])
                         for kind in [None, *set(plan.shallow_kinds[1:])]}

    def split(self, key: str) -> tuple[int | None, str]:
        if not key.startswith(self.prefix):
            return None, key
        index, _, suffix = key[len(self.prefix):].partition(".")
        return int(index), suffix

    def layer_suffixes(self, i: int) -> list[str]:
        return self.suffixes[None if i == 0 else self.plan.kinds[i]]

    def real(self, key: str) -> str:
        """The real model's name of a shallow model's tensor."""
        position, suffix = self.split(key)
        return key if position is None else f"{self.prefix}{self.plan.shallow[position]}.{suffix}"

    def full_model(self) -> list[str]:
        """Every tensor name of the real model (the GGUF name map is built from these)."""
        layers = [f"{self.prefix}{i}.{suffix}" for i in range(len(self.plan.kinds)) for suffix in self.layer_suffixes(i)]
        return self.other + layers


def _shallow_model(config, plan: layerwise.LayerPlan, open_checkpoint: Callable[[list[str]], Checkpoint],
                   ) -> tuple[torch.nn.Module, _Names, Checkpoint]:
    """The shallow model with the real weights of the layers it holds (float32, eval mode), and the checkpoint."""
    from transformers import AutoModelForCausalLM

    reduced = shallow_config(config, plan)
    model = AutoModelForCausalLM.from_config(reduced, dtype=torch.float32).eval()
    names = _Names(model, plan)
    checkpoint = open_checkpoint(names.full_model())
    tied = bool(getattr(layerwise.text_config(config), "tie_word_embeddings", False)
                or getattr(config, "tie_word_embeddings", False))
    state = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    for key, current in state.items():
        real = names.real(key)
        if real in checkpoint:
            if tuple(checkpoint.shape(real)) != tuple(current.shape):
                raise CheckpointError(f"{real} is {tuple(checkpoint.shape(real))} in the checkpoint, "
                                      f"{tuple(current.shape)} in the model")
            loaded[key] = torch.from_numpy(checkpoint.load(real))
        elif not (tied and key == "lm_head.weight"):
            raise CheckpointError(f"the checkpoint has no tensor {real}")
    model.load_state_dict(loaded, strict=False, assign=True)
    if tied:
        model.tie_weights()
    return model, names, checkpoint


def _lazy(checkpoint: Checkpoint, name: str, dtype: torch.dtype, perm: tuple[int, ...] | None = None) -> ir.LazyTensor:
    """``name`` read from the checkpoint (transposed by ``perm``) each time its value is asked for."""
    shape = tuple(checkpoint.shape(name))
    if perm is not None:
        shape = tuple(shape[p] for p in perm)

    def read() -> ir.Tensor:
        array = checkpoint.load(name)
        if perm is not None:
            array = array.transpose(perm)
        return ir.Tensor(np.ascontiguousarray(array, dtype=_NP_DTYPES[dtype]))

    return ir.LazyTensor(read, dtype=_IR_DTYPES[dtype], shape=ir.Shape(shape), name=name)


@dataclasses.dataclass(frozen=True)
class _LazyRead:
    """Where a lazy initializer's values come from, kept on the tensor's meta for the transpose fold below."""

    checkpoint: Checkpoint
    name: str
    dtype: torch.dtype


_READ_KEY = "qexport.lazy_read"


def fold_lazy_transposes(model: ir.Model) -> None:
    """Replace ``Transpose(lazy weight)`` by a lazy transposed weight, as constant folding would, without reading
    it; the exporter writes every linear layer's weight so, and folding it would hold every weight in memory."""
    graph = model.graph
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain != "" or len(node.inputs) != 1:
            continue
        source = node.inputs[0]
        read = source.meta.get(_READ_KEY) if source is not None and source.is_initializer() else None
        if read is None or len(source.uses()) != 1:
            continue
        rank = len(source.shape)
        perm = tuple(node.attributes["perm"].as_ints()) if "perm" in node.attributes else tuple(reversed(range(rank)))
        out = node.outputs[0]
        if out.is_graph_output():
            raise CheckpointError(f"graph output {out.name} is a transposed weight")
        value = ir.Value(name=out.name, type=ir.TensorType(_IR_DTYPES[read.dtype]), shape=ir.Shape([source.shape[p] for p in perm]),
                         const_value=_lazy(read.checkpoint, read.name, read.dtype, perm))
        ir.convenience.replace_all_uses_with(out, value)
        graph.remove(node, safe=True)
        del graph.initializers[source.name]
        graph.register_initializer(value)


def export_from_checkpoint(config, family: Family, open_checkpoint: Callable[[list[str]], Checkpoint],
                           settings: ExportSettings) -> tuple[ir.Model, GraphSignature]:
    """The exported graph of the model ``config`` describes, its weights from the checkpoint ``open_checkpoint``
    opens (given the model's tensor names). Raises :class:`CheckpointError` (or ``LayerwiseError``) where this
    model or checkpoint is not covered: the caller then loads the model and uses ``export_graph``."""
    if not settings.layerwise:
        raise CheckpointError("layerwise disabled in the export settings")
    plan = layerwise.plan_from_config(config, family)
    if isinstance(plan, str):
        raise CheckpointError(plan)
    dtype = DTYPES[settings.dtype]
    model, names, checkpoint = _shallow_model(config, plan, open_checkpoint)
    model = model.to(dtype)
    signature = dataclasses.replace(probe_signature(model, family, settings), num_layers=len(plan.kinds))
    log.info("exporting %d layers (kv cache: %s, %s) from the checkpoint", signature.num_layers, settings.kv_cache,
             settings.dtype)
    onnx_model = _trace(model, signature, settings)
    _, shallow_layers = layerwise._layer_list(model, plan.path)
    buffers = {kind: dict(shallow_layers[0 if kind is None else plan.template(kind)].named_buffers())
               for kind in names.suffixes}

    def layer_tensors(i: int) -> dict[str, layerwise.TensorLike]:
        kind = None if i == 0 else plan.kinds[i]
        tensors: dict[str, layerwise.TensorLike] = dict(buffers[kind])
        for suffix in names.layer_suffixes(i):
            real = f"{names.prefix}{i}.{suffix}"
            if real in checkpoint:
                tensors[suffix] = _lazy(checkpoint, real, dtype)
        return tensors

    layerwise.stamp_layers(onnx_model, layer_tensors, plan)
    for value in onnx_model.graph.initializers.values():
        if isinstance(value.const_value, ir.LazyTensor):
            value.meta[_READ_KEY] = _LazyRead(checkpoint, value.const_value.name, dtype)
    path = ExportPath("layerwise", f"from the checkpoint: traced layers {list(plan.shallow)} of "
                                   f"{signature.num_layers}, the rest stamped and read one tensor at a time")
    finish_export(onnx_model, path, before_cleanup=fold_lazy_transposes)
    return onnx_model, signature


def lazy_initializers(model: ir.Model) -> Iterable[ir.Value]:
    return [v for v in model.graph.initializers.values() if isinstance(v.const_value, ir.LazyTensor)]


def materialize(model: ir.Model) -> int:
    """Read every lazy initializer into memory (for passes that rewrite weights); returns how many were read."""
    values = lazy_initializers(model)
    for value in values:
        value.const_value = value.const_value.raw()
        value.const_value.name = value.name
    return len(values)
