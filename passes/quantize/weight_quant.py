"""Weight quantizers (int8 per channel, int4 / dINT4 per group) and the writers that feed a linear from them.

Formats (symmetric; Δ the scale, q the integer code):

* ``int8``: one Δ per output channel, q in [-127, 127], stored int8 -> ``DequantizeLinear(q, Δ, axis)``;
* ``int8_group``: one Δ per group of ``group_size`` input channels of each output channel, q in [-127, 127],
  stored int8 -> blocked ``DequantizeLinear`` as for int4 (what ONNX Runtime's 8-bit ``MatMulNBits`` reads);
* ``int4``: one Δ per group of ``group_size`` input channels of each output channel, q in [-7, 7], stored INT4
  -> blocked opset-21 ``DequantizeLinear(q, Δ, axis=input axis, block_size=group_size)`` (TensorRT's INT4 form);
* ``dint4`` (Lee et al., EMNLP 2023): the int4 grid with the two codes ±7 reassigned to ±Δ/2,
  levels {0, ±1/2, ±1, ..., ±6}; rounding |w/Δ| < 1/4 -> 0, < 3/4 -> ±1/2, else the nearest integer (at most 6).
  DequantizeLinear is uniform-only, so the INT4 codes go ``Cast(int32) -> Gather`` into a 16-entry level table
  (negative codes index from its end) ``-> Mul(Δ per group) -> Reshape``.

Δ is the group's absmax / q_max, or with ``clip = mse`` the clip ratio r of a grid in [0.5, 1] minimising the
group's squared rounding error, Δ = r · absmax / q_max.
"""

from __future__ import annotations

import dataclasses
import enum

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qexport import numerics
from qexport.errors import RecipeError
from qexport.passes.discovery import sites as site_matching
from qexport.passes._ir import drop_if_unused, new_initializer
from qexport.passes.metadata import Meta

CLIP_RATIOS = np.linspace(1.0, 0.5, 21)  # grid of the MSE clip search
_CHUNK_ELEMENTS = 1 << 22  # quantize weights in blocks of about this many elements (float64 temporaries stay small)
DINT4_TABLE = np.array([0, 1, 2, 3, 4, 5, 6, 0.5, 0, -0.5, -6, -5, -4, -3, -2, -1])  # level of code c at [c mod 16]


class WeightQuant(str, enum.Enum):
    INT8 = "int8"  # per output channel
    INT8_GROUP = "int8_group"  # per group of input channels, blocked DequantizeLinear
    INT4 = "int4"  # per group of input channels, blocked DequantizeLinear
    DINT4 = "dint4"  # per group, codes ±7 decode to ±1/2 through a lookup table


class WeightClip(str, enum.Enum):
    NONE = "none"  # Δ = absmax / q_max
    MSE = "mse"  # Δ = r · absmax / q_max, r minimising the group's squared error


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """How weights are quantized; ``group_size`` applies to int8_group/int4/dint4 (int8 is per output channel)."""

    kind: WeightQuant = WeightQuant.INT8
    group_size: int = 128
    clip: WeightClip = WeightClip.NONE

    def __post_init__(self) -> None:
        for name, enum_type, setting in (("kind", WeightQuant, "weights"), ("clip", WeightClip, "weight_clip")):
            try:
                object.__setattr__(self, name, enum_type(getattr(self, name)))
            except ValueError:
                raise RecipeError(f"{setting} must be one of {[m.value for m in enum_type]}, "
                                  f"got {getattr(self, name)!r}") from None
        if self.group_size < 1:
            raise RecipeError(f"group_size must be positive, got {self.group_size}")

    @property
    def qmax(self) -> float:
        return {WeightQuant.INT8: float(numerics.INT8_QMAX), WeightQuant.INT8_GROUP: float(numerics.INT8_QMAX),
                WeightQuant.INT4: float(numerics.int_qmax(4)),
                WeightQuant.DINT4: 6.0}[self.kind]

    @property
    def grouped(self) -> bool:
        return self.kind is not WeightQuant.INT8

    def group_rows(self, in_features: int, where: str = "") -> int:
        """Input channels per scale: ``in_features`` for int8, else ``group_size``, which must divide it."""
        if not self.grouped:
            return in_features
        check_group_divides(in_features, self.group_size, where)
        return self.group_size

    def codes(self, y: np.ndarray) -> np.ndarray:
        """Integer codes of ``y`` = w / Δ (dINT4: ±7 stand for ±1/2)."""
        if self.kind is not WeightQuant.DINT4:
            return numerics.round_codes(y, self.qmax)
        a = np.abs(y)
        mag = np.where(a < 0.25, 0.0, np.where(a < 0.75, 7.0, np.minimum(np.round(a), 6.0)))
        return np.sign(y) * mag

    def levels(self, codes: np.ndarray) -> np.ndarray:
        """Multiples of Δ the codes decode to."""
        if self.kind is not WeightQuant.DINT4:
            return np.asarray(codes, dtype=np.float64)
        return DINT4_TABLE[np.asarray(codes, dtype=np.int64) % 16]

    def fake_quant(self, w: np.ndarray, scale: np.ndarray) -> np.ndarray:
        return self.levels(self.codes(w / scale)) * scale

    def scale(self, rows: np.ndarray) -> np.ndarray:
        """Δ per column of ``rows`` [group, out] (one group of input channels)."""
        absmax = np.abs(rows).max(axis=0)
        base = numerics.absmax_scale(absmax, self.qmax)
        if self.clip is WeightClip.NONE:
            return base
        best, best_err = base, np.full(base.shape, np.inf)
        for ratio in CLIP_RATIOS:
            s = base * ratio
            err = ((self.fake_quant(rows, s) - rows) ** 2).sum(axis=0)
            better = err < best_err
            best, best_err = np.where(better, s, best), np.where(better, err, best_err)
        return best

    def quantize(self, w_in_out: np.ndarray, where: str = "") -> tuple[np.ndarray, np.ndarray]:
        """Round-to-nearest: (codes int8 [in, out], Δ [in / group, out]) for an [in, out] weight."""
        rows = self.group_rows(w_in_out.shape[0], where)
        codes = np.empty(w_in_out.shape, dtype=np.int8)
        scales = []
        step = max(1, _CHUNK_ELEMENTS // max(1, w_in_out.shape[0]))
        for start in range(0, w_in_out.shape[1], step):  # every column is its own: blocks of columns are exact
            part = np.asarray(w_in_out[:, start:start + step], dtype=np.float64)
            groups = part.reshape(-1, rows, part.shape[1])
            scale = np.stack([self.scale(g) for g in groups])
            codes[:, start:start + step] = self.codes(groups / scale[:, None, :]).reshape(part.shape)
            scales.append(scale)
        return codes, np.concatenate(scales, axis=1)

    def dequantize(self, codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """The [in, out] float weight of (codes, Δ [groups, out]) as the graph computes it."""
        return self.levels(codes) * np.repeat(scale, codes.shape[0] // scale.shape[0], axis=0)


def check_group_divides(width: int, group_size: int, where: str = "", setting: str = "") -> None:
    """A RecipeError naming ``where`` and the group sizes that fit, when ``group_size`` does not divide ``width``
    input channels (``setting`` says whose group size it is, before the message)."""
    if width % group_size:
        fits = [g for g in (16, 32, 64, 128) if width % g == 0]
        raise RecipeError(f"{setting}group_size {group_size} does not divide the {width} input channels of "
                          f"{where or 'a linear'}; use a group_size that does (e.g. {fits or 'a divisor'})")


def write_quantized_weight(graph: ir.Graph, linear: site_matching.Linear, q: np.ndarray, scale: np.ndarray,
                           fmt: WeightFormat = WeightFormat()) -> None:
    """Feed the linear's weight input from its dequantized codes ``q`` (int8 [in, out]) and scales ``scale``
    ([out] for int8; [in / group, out] for int8_group/int4/dint4)."""
    dtype = linear.weight.const_value.numpy().dtype
    gemm_trans = linear.node.op_type == "Gemm" and linear.layout == "out_in"
    base = linear.weight.name if linear.transpose is None else f"{linear.weight.name}.T"
    scale = np.asarray(scale, dtype=dtype)
    if fmt.kind is WeightQuant.INT8:
        stored, axis = (q.T, 0) if gemm_trans else (q, 1)
        q_value = new_initializer(graph, f"{base}.int8", np.ascontiguousarray(stored))
        s_value = new_initializer(graph, f"{base}.scale", scale.reshape(-1))
        nodes = [ir.node("DequantizeLinear", [q_value, s_value], {"axis": axis}, name=f"{base}.dq")]
    elif fmt.kind in (WeightQuant.INT4, WeightQuant.INT8_GROUP):
        stored, s_stored, axis = (q.T, scale.T, 1) if gemm_trans else (q, scale, 0)
        stored = np.ascontiguousarray(stored)
        q_value = (new_initializer(graph, f"{base}.int4", stored.astype(ml_dtypes.int4)) if fmt.kind is WeightQuant.INT4
                   else new_initializer(graph, f"{base}.int8g", stored.astype(np.int8)))
        s_value = new_initializer(graph, f"{base}.scale", np.ascontiguousarray(s_stored))
        block = q.shape[0] // scale.shape[0]
        nodes = [ir.node("DequantizeLinear", [q_value, s_value], {"axis": axis, "block_size": block}, name=f"{base}.dq")]
    else:
        stored = q.T if gemm_trans else q
        nodes = _lookup_nodes(graph, base, stored, scale, gemm_trans, dtype)
    for node in nodes:
        tagged(node, "weight")
        node.outputs[0].name = node.name
    out = nodes[-1].outputs[0]
    out.dtype, out.shape = ir.DataType.from_numpy(dtype), ir.Shape(q.T.shape if gemm_trans else q.shape)
    graph.insert_before(linear.node, nodes)
    old = linear.node.inputs[1]
    linear.node.replace_input_with(1, out)
    if linear.transpose is not None and not linear.transpose.outputs[0].uses():
        graph.remove(linear.transpose, safe=True)
    drop_if_unused(graph, linear.weight)
    if old is not linear.weight:
        drop_if_unused(graph, old)


def _lookup_nodes(graph: ir.Graph, base: str, stored: np.ndarray, scale: np.ndarray, gemm_trans: bool,
                  dtype: np.dtype) -> list[ir.Node]:
    """dINT4: INT4 codes grouped [groups, group, out] (Gemm transB: [out, groups, group]) -> Cast -> Gather
    (level table) -> Mul (Δ [groups, 1, out] / [out, groups, 1]) -> Reshape to the stored weight shape."""
    groups = scale.shape[0]
    if gemm_trans:
        codes, s = stored.reshape(stored.shape[0], groups, -1), scale.T[:, :, None]
    else:
        codes, s = stored.reshape(groups, -1, stored.shape[1]), scale[:, None, :]
    c_value = new_initializer(graph, f"{base}.dint4", np.ascontiguousarray(codes).astype(ml_dtypes.int4))
    table = new_initializer(graph, f"{base}.dint4_levels", DINT4_TABLE.astype(dtype))
    s_value = new_initializer(graph, f"{base}.scale", np.ascontiguousarray(s))
    shape = new_initializer(graph, f"{base}.shape", np.array(stored.shape, np.int64))
    cast = ir.node("Cast", [c_value], {"to": ir.DataType.INT32.value}, name=f"{base}.codes")
    gather = ir.node("Gather", [table, cast.outputs[0]], {"axis": 0}, name=f"{base}.levels")
    mul = ir.node("Mul", [gather.outputs[0], s_value], name=f"{base}.scaled")
    reshape = ir.node("Reshape", [mul.outputs[0], shape], name=f"{base}.dq")
    cast.outputs[0].dtype = ir.DataType.INT32
    gather.outputs[0].dtype = mul.outputs[0].dtype = ir.DataType.from_numpy(np.dtype(dtype))
    return [cast, gather, mul, reshape]


def tagged(node: ir.Node, kind: str) -> ir.Node:
    """Mark ``node`` as inserted by quantization (``kind``: "weight", "per_token", "per_tensor")."""
    node.metadata_props[Meta.QUANT] = kind
    return node
