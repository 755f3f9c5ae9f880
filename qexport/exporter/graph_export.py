"""Export a causal LM to one ONNX graph that serves prefill and decode (KV cache), via the dynamo exporter."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import warnings
from typing import Callable

import onnx_ir as ir
import onnx_ir.passes.common
import torch

from qexport.exporter import layerwise
from qexport.exporter.families import Family
from qexport.exporter.naming import name_by_order
from qexport.runtimes.signature import GraphSignature

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
EXPORT_PATH_KEY = "qexport.export_path"  # in ir.Model.meta (in memory, not saved): the ExportPath taken


@dataclasses.dataclass(frozen=True)
class ExportPath:
    """How the graph was traced: ``"layerwise"`` (a shallow trace, layers stamped) or ``"whole-model"``, and why."""

    path: str
    reason: str


def export_path_of(model: ir.Model) -> ExportPath | None:
    """The path ``export_graph`` took for ``model``; ``None`` for a model it did not produce in this process."""
    return model.meta.get(EXPORT_PATH_KEY)


@dataclasses.dataclass(frozen=True)
class ExportSettings:
    """How the graph is exported."""

    dtype: str = "fp32"
    kv_cache: bool = True
    opset: int = 21
    layerwise: bool = True  # trace a few layers and stamp the rest where the model allows; False: trace it whole

    def __post_init__(self) -> None:
        if not isinstance(self.layerwise, bool):
            raise ValueError(f"layerwise must be True or False, got {self.layerwise!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.opset < 21:
            raise ValueError("opset must be 21 or later (blocked QDQ needs it)")


class CausalLMWithCache(torch.nn.Module):
    """Flat-tensor front of a Hugging Face causal LM: past key/values in, logits and present out."""

    def __init__(self, model: torch.nn.Module, signature: GraphSignature) -> None:
        super().__init__()
        self.model = model
        self.signature = signature

    def forward(self, input_ids, attention_mask, position_ids=None, past=()):
        from transformers import DynamicCache

        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if not self.signature.kv_cache:
            return self.model(**kwargs, use_cache=False).logits
        # A cache without the config holds every layer in full; sliding-window layers mask instead of truncating,
        # so all layers share one past length and the graph keeps one dynamic axis for it.
        cache = DynamicCache()
        for i in range(self.signature.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(**kwargs, past_key_values=cache, use_cache=True)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def probe_signature(model: torch.nn.Module, family: Family, settings: ExportSettings) -> GraphSignature:
    """Read the KV-cache layout by running the model once on two tokens."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 2]]), use_cache=True)
    layers = out.past_key_values.layers
    shapes = {tuple(layer.keys.shape[1::2]) for layer in layers}
    if len(shapes) != 1:
        raise NotImplementedError(f"layers with different KV-cache shapes are not supported yet: {shapes}")
    (kv_heads, head_dim), = shapes
    return GraphSignature(
        num_layers=len(layers),
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        kv_cache=settings.kv_cache,
        uses_position_ids=family.uses_position_ids,
        dtype=settings.dtype,
    )


def _example_inputs(signature: GraphSignature, dtype: torch.dtype):
    batch, seq, past_len = 2, 3, 4
    input_ids = torch.tensor([[1, 2, 3], [4, 5, 6]], dtype=torch.long)
    attention_mask = torch.ones(batch, past_len + seq if signature.kv_cache else seq, dtype=torch.long)
    start = past_len if signature.kv_cache else 0
    position_ids = torch.arange(start, start + seq).unsqueeze(0).expand(batch, seq).contiguous()
    shape = (batch, signature.num_kv_heads, past_len, signature.head_dim)
    past = [torch.zeros(shape, dtype=dtype) for _ in signature.past_names]
    args: list = [input_ids, attention_mask]
    args.append(position_ids if signature.uses_position_ids else None)
    args.append(past)
    return tuple(args)


def _dynamic_shapes(signature: GraphSignature):
    from torch.export import Dim

    batch, seq = Dim("batch"), Dim("sequence")
    total = Dim("total_sequence") if signature.kv_cache else seq
    past_len = Dim("past_sequence")
    return {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
        "position_ids": {0: batch, 1: seq} if signature.uses_position_ids else None,
        "past": [{0: batch, 2: past_len} for _ in signature.past_names],
    }


def export_graph(model: torch.nn.Module, family: Family, settings: ExportSettings) -> tuple[ir.Model, GraphSignature]:
    """Export ``model`` (float32, eval mode) to an ONNX IR model with the Optimum-style signature.

    Layer-wise where the model allows (see :mod:`qexport.exporter.layerwise`), else the whole model is traced;
    ``export_path_of(model)`` tells which and why. Generated names follow graph order
    (:mod:`qexport.exporter.naming`).
    """
    dtype = DTYPES[settings.dtype]
    model = model.to(dtype)
    signature = probe_signature(model, family, settings)
    log.info("exporting %d layers (kv cache: %s, %s)", signature.num_layers, settings.kv_cache, settings.dtype)
    ir_model, path = None, ExportPath("whole-model", "layerwise disabled in the export settings")
    plan = layerwise.plan_layers(model, family, signature.num_layers) if settings.layerwise else None
    if isinstance(plan, str):
        path = ExportPath("whole-model", plan)
    elif plan is not None:
        try:
            ir_model = layerwise.trace_layerwise(model, plan, lambda: _trace(model, signature, settings))
            path = ExportPath("layerwise", f"traced layers {list(plan.shallow)} of {signature.num_layers}, "
                                           f"stamped the rest")
        except Exception as error:  # noqa: BLE001  (any failure of the shortcut: trace the whole model instead)
            log.warning("layer-wise export failed, tracing the whole model: %s: %s", type(error).__name__, error)
            ir_model, path = None, ExportPath("whole-model", f"layer-wise export failed: {type(error).__name__}: {error}")
    if ir_model is None:
        ir_model = _trace(model, signature, settings)
    finish_export(ir_model, path)
    return ir_model, signature


def finish_export(ir_model: ir.Model, path: ExportPath, before_cleanup: Callable[[ir.Model], None] | None = None,
                  ) -> None:
    """Name, clean up and stamp a raw trace (whole, or stamped layer by layer), in place; ``before_cleanup`` runs
    on the named raw graph."""
    log.info("export path: %s (%s)", path.path, path.reason)
    name_by_order(ir_model.graph)  # unique names for cleanup's lifted constants, whichever path traced
    if before_cleanup is not None:
        before_cleanup(ir_model)
    cleanup(ir_model)
    name_by_order(ir_model.graph)  # the final names: the same for both paths where the graphs are the same
    ir_model.producer_name = "qexport"
    ir_model.producer_version = _version()
    ir_model.meta[EXPORT_PATH_KEY] = path


def _trace(model: torch.nn.Module, signature: GraphSignature, settings: ExportSettings) -> ir.Model:
    """The raw dynamo trace of ``model`` behind the flat-tensor wrapper, before ``cleanup``."""
    dtype = DTYPES[settings.dtype]
    wrapper = CausalLMWithCache(model, signature).eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad(), _quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            _example_inputs(signature, dtype),
            dynamo=True,
            dynamic_shapes=_dynamic_shapes(signature),
            input_names=signature.input_names,
            output_names=signature.output_names,
            opset_version=settings.opset,
            optimize=False,
            verbose=False,
        )
    return program.model


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's own chatter (e.g. 'torchvision is not installed') for the duration of an export."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def cleanup(model: ir.Model) -> None:
    """Fold constants, lift them to initializers, drop dead nodes and deduplicate, in place.

    This is the cheap part of the exporter's own optimizer: its pattern-rewrite rules are slow on a
    full-size model and change little that ONNX Runtime does not redo when it loads the graph.
    """
    from onnxscript.optimizer import _constant_folding

    common = onnx_ir.passes.common
    fold = _constant_folding.FoldConstantsPass(
        shape_inference=True,
        input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
        output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
    )
    ir.passes.Sequential(
        common.InlinePass(),
        ir.passes.PassManager([fold, common.RemoveUnusedNodesPass()], steps=2, early_stop=True),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qexport")
    except PackageNotFoundError:
        return "0+unknown"
