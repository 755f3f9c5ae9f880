"""Calibration and evaluation text: a user's file, a Hugging Face dataset, or prose the machine carries.

Built-in domains (``machine_text``): the Python documentation (``pydoc``, on every Python install), the English
manual pages (``manpages``) and git's release notes (``gitnotes``), each split in two disjoint halves, one for
evaluation and one for calibration, so calibration text never leaks into evaluation. ``a+b`` mixes domains,
alternating chunks of each, so that calibrated scales and GPTQ's Hessians need not fit one narrow domain.
Evaluation and calibration both default to the Python documentation (their disjoint halves).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np

from qexport.errors import TextSourceError
from qexport.exporter import machine_text
from qexport.exporter.machine_text import DOMAINS, PURPOSES, pydoc_text  # noqa: F401 (pydoc_text: re-exported)

log = logging.getLogger(__name__)

DATASET_SPLITS = {"evaluation": ("test", "validation"), "calibration": ("train", "validation")}
MACHINE = "machine"  # the built-in calibration mix of the domains this machine has (machine_source)
MACHINE_DOMAINS = ("pydoc", "manpages")
MIX_CHUNK_CHARS = 2_000  # about 500 tokens: a 512-token window sees both domains of a two-domain mix


@dataclasses.dataclass(frozen=True)
class TextSource:
    """Where text comes from: a built-in domain (``pydoc``, ``manpages``, ``gitnotes``), ``mix`` of them
    (``location`` ``"pydoc+manpages"``), ``file`` or ``dataset`` (``name`` or ``name:config``)."""

    kind: str = "pydoc"
    location: str | None = None

    def describe(self) -> str:
        if self.kind == "pydoc":
            return "pydoc_data.topics"
        return self.kind if self.kind in DOMAINS else f"{self.kind}:{self.location}"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def machine_source() -> TextSource:
    """``machine``: the calibration prose this machine carries, mixed: the Python documentation, plus the English
    manual pages where they are installed (a minimal container may have none: then the documentation alone, with a
    warning). git's release notes stay out, kept as a domain no default calibration has seen. The source returned
    names the domains actually used, so the manifest and ``qexport report`` record them."""
    found = [d for d in MACHINE_DOMAINS if d == "pydoc" or machine_text.has_text(d, "calibration")]
    if len(found) < len(MACHINE_DOMAINS):
        log.warning("this machine carries no %s text: calibrating on %s alone",
                    " or ".join(d for d in MACHINE_DOMAINS if d not in found), "+".join(found))
    return TextSource(found[0]) if len(found) == 1 else TextSource("mix", "+".join(found))


def _builtin(spec: str) -> TextSource | None:
    """``pydoc``, ``manpages``, ``gitnotes``, a ``+``-joined mix of them, or ``machine``; None for anything else."""
    if spec == MACHINE:
        return machine_source()
    parts = spec.split("+")
    if not all(part in DOMAINS for part in parts):
        return None
    if len(set(parts)) != len(parts):
        raise TextSourceError(f"text mix {spec!r} names a domain twice")
    return TextSource(parts[0]) if len(parts) == 1 else TextSource("mix", spec)


def default_calibration_source() -> TextSource:
    """The calibration half of the Python documentation, for recipes that name no ``calibration.text``. The
    ``machine`` mix carries over better to text of other domains; the presets where that was measured to pay
    (``w4a8-group``, ``w4a8-group-ort``) name it. On ``w4a8`` it trades the documentation for the unseen domain and
    meets neither target; the W8A8 presets were not measured with it (``w8a8-group`` calibrates nothing)
    (docs/measurements.md)."""
    return TextSource()


def text_source(text_file: str | None = None, dataset: str | None = None) -> TextSource:
    """Build an evaluation source from the CLI's ``--text FILE|DOMAIN`` / ``--dataset NAME`` (at most one)."""
    if text_file and dataset:
        raise TextSourceError("pass either --text FILE or --dataset NAME, not both")
    if text_file:
        if not Path(text_file).expanduser().exists() and (builtin := _builtin(text_file)) is not None:
            return builtin
        return TextSource("file", str(text_file))
    if dataset:
        return TextSource("dataset", dataset)
    return TextSource()


def parse_source(spec: str | None) -> TextSource:
    """``--calib SOURCE``: an existing file path, a built-in domain or mix, else a dataset name; None means the
    default calibration text."""
    if not spec:
        return default_calibration_source()
    if Path(spec).expanduser().exists():
        return TextSource("file", spec)
    if (builtin := _builtin(spec)) is not None:
        return builtin
    if spec.startswith((".", "/", "~")) or spec.endswith((".txt", ".md")):
        raise TextSourceError(f"text file not found: {spec}")
    return TextSource("dataset", spec)


def _chunks(text: str, size: int) -> list[str]:
    """``text`` cut at paragraph breaks into pieces of about ``size`` characters."""
    pieces, current, length = [], [], 0
    for paragraph in text.split("\n\n"):
        current.append(paragraph)
        length += len(paragraph)
        if length >= size:
            pieces.append("\n\n".join(current))
            current, length = [], 0
    if current:
        pieces.append("\n\n".join(current))
    return pieces


def mix_text(domains: list[str], purpose: str) -> str:
    """The domains' ``purpose`` halves, alternating chunks of about MIX_CHUNK_CHARS, until the shortest runs out."""
    chunked = [_chunks(DOMAINS[d](purpose), MIX_CHUNK_CHARS) for d in domains]
    rounds = min(len(c) for c in chunked)
    return "\n\n".join(chunks[i] for i in range(rounds) for chunks in chunked)


def _file_text(path: str) -> str:
    file = Path(path).expanduser()
    if not file.is_file():
        raise TextSourceError(f"text file not found: {path}")
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TextSourceError(f"{path} is not UTF-8 text ({exc})") from exc


def _dataset_text(spec: str, purpose: str) -> str:
    try:
        import datasets
    except ImportError as exc:
        raise TextSourceError(
            "--dataset needs the 'datasets' package: pip install 'qexport[datasets]', or pass --text FILE"
        ) from exc
    name, _, config = spec.partition(":")
    errors = []
    for split in DATASET_SPLITS[purpose]:
        try:
            data = datasets.load_dataset(name, config or None, split=split)
        except ValueError as exc:  # unknown split: try the next one
            errors.append(f"{split}: {exc}")
            continue
        except Exception as exc:  # hub/network errors come in many types
            raise TextSourceError(
                f"could not load dataset {spec!r} ({type(exc).__name__}: {exc}). If this machine is offline, "
                "save the text to a file and pass --text FILE, or use the default (Python's documentation)"
            ) from exc
        column = "text" if "text" in data.column_names else data.column_names[0]
        return "\n\n".join(row for row in data[column] if row)
    raise TextSourceError(f"dataset {spec!r} has none of the splits {DATASET_SPLITS[purpose]}: {errors}")


def load_text(source: TextSource, purpose: str) -> str:
    """The text of ``source`` for ``purpose`` ('evaluation' or 'calibration'); never empty."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}")
    if source.kind in DOMAINS:
        text = DOMAINS[source.kind](purpose)
    elif source.kind == "mix":
        domains = (source.location or "").split("+")
        if len(domains) < 2 or not all(d in DOMAINS for d in domains):
            raise TextSourceError(f"a text mix names two or more of {sorted(DOMAINS)} joined by '+', not "
                                  f"{source.location!r}")
        text = mix_text(domains, purpose)
    elif source.kind == "file":
        text = _file_text(source.location or "")
    elif source.kind == "dataset":
        text = _dataset_text(source.location or "", purpose)
    else:
        raise TextSourceError(f"unknown text source kind {source.kind!r}")
    if not text.strip():
        raise TextSourceError(f"the text from {source.describe()} is empty")
    return text


def default_bos(tokenizer) -> int | None:
    """The BOS id the tokenizer puts before a text by default (Gemma, Llama 3), or None if it adds none."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return int(bos) if with_special[:1] == [bos] and plain[:1] != [bos] else None


def token_windows(tokenizer, text: str, seq_len: int, count: int, source: str = "the text") -> list[np.ndarray]:
    """Up to ``count`` non-overlapping windows of ``seq_len`` tokens; errors if not even one fits.

    Where the tokenizer adds a BOS token by default, each window starts with it, as the model saw every sequence
    in training (then ``seq_len - 1`` text tokens follow, and BOS itself is never a scored token)."""
    if seq_len < 2:
        raise TextSourceError("--seq-len must be at least 2")
    bos = default_bos(tokenizer)
    span = seq_len - (bos is not None)
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    available = len(ids) // span
    if available == 0:
        raise TextSourceError(
            f"{source} has {len(ids)} tokens, fewer than one window of {seq_len}; "
            "pass a longer text or a smaller --seq-len"
        )
    if available < count:
        log.warning("%s has only %d windows of %d tokens (asked for %d)", source, available, seq_len, count)
    windows = [ids[i * span : (i + 1) * span] for i in range(min(count, available))]
    if bos is not None:
        windows = [np.concatenate([np.array([bos], dtype=np.int64), w]) for w in windows]
    return windows
