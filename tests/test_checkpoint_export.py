"""Export straight from a checkpoint (shallow model built from the config, other layers read tensor by tensor)
against the export of the loaded model: the same graph, the same weights, exactly."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
import torch

import qexport
from qexport.exporter.checkpoint import CheckpointError, SafetensorsCheckpoint
from qexport.exporter.checkpoint_export import export_from_checkpoint, lazy_initializers, materialize
from qexport.exporter.families import family_for
from qexport.exporter.graph_export import ExportSettings, export_graph, export_path_of
from qexport.exporter.loading import checkpoint_opener, load_config, load_model, resolve_source
from test_layerwise_export import _deep_model
from tiny_models import make_tiny_model


def _described(model: ir.Model):
    return [(n.domain, n.op_type, [v.name if v is not None else None for v in n.inputs], [v.name for v in n.outputs])
            for n in model.graph]


def _assert_same_export(loaded: ir.Model, read: ir.Model, atol: float = 0.0) -> None:
    assert _described(read) == _described(loaded)
    assert [v.name for v in read.graph.inputs] == [v.name for v in loaded.graph.inputs]
    assert [v.name for v in read.graph.outputs] == [v.name for v in loaded.graph.outputs]
    assert read.graph.initializers.keys() == loaded.graph.initializers.keys()
    for name, value in loaded.graph.initializers.items():
        want, got = value.const_value.numpy(), read.graph.initializers[name].const_value.numpy()
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=name)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            model = _deep_model(family)
            folder = tmp_path_factory.mktemp(f"ckpt-{family}")
            model.save_pretrained(folder)
            cache[family] = (model, folder)
        return cache[family]

    return get


def test_checkpoint_export_equals_the_loaded_models(folders, family):
    model, folder = folders(family)
    source = resolve_source(str(folder))
    config = load_config(source)
    fam = family_for(config.model_type)
    loaded, loaded_signature = export_graph(model, fam, ExportSettings())
    read, signature = export_from_checkpoint(config, fam, checkpoint_opener(source, config), ExportSettings())
    assert signature == loaded_signature
    assert export_path_of(read).path == "layerwise" and "checkpoint" in export_path_of(read).reason
    lazy = lazy_initializers(read)
    # every stamped layer's large weights stay in the checkpoint until read (the transposes folded lazily)
    assert len(lazy) >= 4 * (signature.num_layers - 1)
    _assert_same_export(loaded, read)
    assert materialize(read) == len(lazy) and not lazy_initializers(read)
    _assert_same_export(loaded, read)


def test_export_api_takes_the_checkpoint_path_and_falls_back_for_bin_weights(tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    folder = make_tiny_model("llama", tmp_path / "src", overrides={"num_hidden_layers": 4})
    out = qexport.export(str(folder), tmp_path / "ckpt")
    export = json.loads((out / "qexport.json").read_text())["export"]
    assert export["path"] == "layerwise" and "from the checkpoint" in export["path_reason"]

    bin_folder = tmp_path / "bin"
    shutil.copytree(folder, bin_folder, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(AutoModelForCausalLM.from_pretrained(folder).state_dict(), bin_folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        SafetensorsCheckpoint(bin_folder)
    out = qexport.export(str(bin_folder), tmp_path / "bin-out")
    export = json.loads((out / "qexport.json").read_text())["export"]
    assert export["path"] == "layerwise" and "loaded whole" in export["path_reason"]
    assert "model.safetensors" in export["path_reason"]
    _assert_same_export(ir.load(out / "model.onnx"), ir.load(tmp_path / "ckpt" / "model.onnx"))


@pytest.mark.slow
def test_default_gguf_read_tensor_by_tensor_equals_the_loaded_model():
    source = resolve_source(None)
    config, fam, model, _ = load_model(source)
    loaded, _ = export_graph(model, fam, ExportSettings())
    del model
    read, _ = export_from_checkpoint(config, fam, checkpoint_opener(source, config), ExportSettings())
    assert len(lazy_initializers(read)) > 100
    _assert_same_export(loaded, read, atol=1e-6)
