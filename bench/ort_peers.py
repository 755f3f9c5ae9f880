"""ONNX Runtime's own quantizers as peers in bench_quant.py, each applied to a copy of the FP32 export's folder."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable

from qexport.artifact.folder import MODEL_FILE


def quantized(fp32: Path, out: Path, quantize: Callable[[Path, Path], None]) -> float:
    """Copy the FP32 folder to ``out`` with its model replaced by ORT's quantized one; returns seconds."""
    shutil.copytree(fp32, out, ignore=shutil.ignore_patterns(MODEL_FILE))
    start = time.perf_counter()
    quantize(fp32 / MODEL_FILE, out / MODEL_FILE)
    return time.perf_counter() - start


def dynamic(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, dst, per_channel=True, weight_type=QuantType.QInt8)


def static(calib_windows: list, smooth_quant: bool = False) -> Callable[[Path, Path], None]:
    """ORT's quantize_static (QDQ, per-channel, MinMax); with ``smooth_quant`` its SmoothQuant option (alpha 0.5,
    folded), which needs Intel Neural Compressor 2.x (``neural_compressor.adaptor.ox_utils``)."""
    def run(src: Path, dst: Path) -> None:
        import numpy as np
        import onnx
        from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

        inputs = onnx.load(str(src), load_external_data=False).graph.input

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.items = iter(calib_windows)

            def get_next(self):
                ids = next(self.items, None)
                if ids is None:
                    return None
                feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, len(ids)), np.int64)}
                for value in inputs:
                    if value.name == "position_ids":
                        feeds[value.name] = np.arange(len(ids), dtype=np.int64)[None]
                    elif value.name not in feeds:  # empty KV cache
                        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
                        feeds[value.name] = np.zeros((1, dims[1], 0, dims[3]), np.float32)
                return feeds

        quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"SmoothQuant": True, "SmoothQuantAlpha": 0.5, "SmoothQuantFolding": True}
                        if smooth_quant else None)

    return run
