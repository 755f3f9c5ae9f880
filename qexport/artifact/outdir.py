"""Output folders written atomically: build in a temporary sibling folder, rename at the end."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from qexport.errors import OutputExistsError, QexportError

MANIFEST = "qexport.json"


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out`` only if the block finishes without error."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"output folder {out} exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output path {out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksums(folder: Path, names: list[str]) -> dict[str, str]:
    """sha256 of each named file in ``folder``."""
    return {name: sha256_file(folder / name) for name in names if (folder / name).is_file()}


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """Read ``qexport.json`` from an output folder, with a clear error if it is not one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QexportError(f"{folder} is not a folder; pass the --out folder of `qexport export`")
    path = folder / MANIFEST
    if not path.is_file():
        raise QexportError(f"{folder} is not a qexport output folder (no {MANIFEST}); run `qexport export` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise QexportError(f"{path} is not valid JSON ({exc}); export the model again") from exc
