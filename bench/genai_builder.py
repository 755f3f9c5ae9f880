"""onnxruntime-genai's model builder as a peer in the bench: the source saved once as a Hugging Face folder, and
the builder's fp32, int8 and int4 models of it, each timed as the wall time of its command (as a user runs it).

The qexport FP32 export of the same folder is timed the same way (:func:`qexport_export`), so the two build
times compare like for like: one command each, interpreter start and model load included.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("bench_quant")

# row name -> (the builder's --precision, its --extra_options); accuracy_level 4 quantizes the activations of
# MatMulNBits to int8 per block along K (the CPU default, written out so that the row says what it measures)
BUILDS: dict[str, tuple[str, dict[str, str]]] = {
    "builder fp32": ("fp32", {}),
    "builder int8 (acc 4)": ("int8", {"accuracy_level": "4"}),
    "builder int4 k_quant (acc 4)": ("int4", {"algo_config": "k_quant", "accuracy_level": "4"}),
    "builder int4 rtn (acc 4)": ("int4", {"algo_config": "rtn", "accuracy_level": "4"}),
}
HF_WEIGHTS = "model.safetensors"


def available() -> bool:
    """Whether onnxruntime-genai (and so its builder) is importable."""
    return importlib.util.find_spec("onnxruntime_genai") is not None


def hf_folder(model: str | None, work: Path) -> Path:
    """``model`` as a Hugging Face folder (float32 safetensors and its tokenizer): the folder itself when it is one,
    else saved once under ``work/hf/`` and reused by later runs."""
    import torch

    from qexport.exporter.loading import load_model, resolve_source

    source = resolve_source(model)
    if source.kind == "folder":
        return Path(source.location)
    name = Path(source.gguf_file).stem if source.gguf_file else source.location.replace("/", "--")
    folder = work / "hf" / name
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        log.info("reusing the Hugging Face folder %s", folder)
        return folder
    log.info("saving %s as a Hugging Face folder in %s", source.describe(), folder)
    config, _, loaded, tokenizer = load_model(source)
    with torch.device("meta"):
        torch_model = type(loaded)(config)  # transformers will not save a model loaded from GGUF; a plain twin
    torch_model.load_state_dict(loaded.state_dict(), assign=True)
    torch_model.tie_weights()
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    torch_model.save_pretrained(partial)  # float32 as loaded; safetensors
    tokenizer.save_pretrained(partial)
    os.replace(partial, folder)  # a run stopped halfway leaves no folder that a later run would reuse
    return folder


def _timed(command: list[str], what: str) -> float:
    """Run ``command``; its wall time in seconds, or a RuntimeError naming ``what`` with the end of its output."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{what} exited {done.returncode}: {' | '.join(tail)}")
    return seconds


def builder_command(hf: Path, out: Path, precision: str, extra: dict[str, str], cache: Path) -> list[str]:
    """The builder's command line for one model, CPU execution provider."""
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
               "-p", precision, "-e", "cpu", "-c", str(cache)]
    if extra:
        command += ["--extra_options", *(f"{key}={value}" for key, value in extra.items())]
    return command


def build(hf: Path, out: Path, precision: str, extra: dict[str, str]) -> float:
    """Build one model with the builder into ``out`` (its own cache folder beside it); returns seconds."""
    return _timed(builder_command(hf, out, precision, extra, out.with_name(out.name + "-cache")),
                  "the builder")


def qexport_export(hf: Path, out: Path) -> float:
    """`qexport export HF --out OUT` (FP32) as a command; returns seconds."""
    return _timed([sys.executable, "-m", "qexport.cli", "-q", "export", str(hf), "--out", str(out)], "qexport export")
