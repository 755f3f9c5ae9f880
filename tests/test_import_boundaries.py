"""Dependencies point one way: CLI -> api -> recipes/report -> passes and calibration -> IR helpers.

Every import in the package (module level and inside functions; ``if TYPE_CHECKING:`` blocks excepted) is
read from the source and checked against the areas each area may import. A new arrow that runs back up fails
here, with the file, the line and the rule it breaks.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"qexport": "qexport", "passes": "qexport.passes", "runtimes": "qexport.runtimes"}

# area -> the areas it may import (its own modules are always allowed). An area is a module's package
# (``qexport.passes.ort``); the first match in AREAS, longest prefix first, names it.
ALLOWED: dict[str, set[str]] = {
    "qexport.errors": set(),
    "qexport.numerics": set(),  # numpy only: fake quantization, SQNR, cosine, max-abs
    "qexport.tensors": set(),  # onnx_ir only: large initializers as external stubs
    "qexport.runtimes": {"qexport.errors"},
    "qexport.runtimes.torch_runner": {"qexport.errors", "qexport.runtimes", "qexport.exporter"},  # runs torch
    "qexport.runtimes.tensorrt": {"qexport.errors", "qexport.runtimes"},
    "qexport.passes._ir": set(),
    "qexport.passes._settings": {"qexport.errors"},  # the passes' checks of their own settings
    "qexport.passes.metadata": set(),  # the metadata keys passes, calibration, analysis and report share
    "qexport.passes.discovery": {"qexport.errors", "qexport.passes._ir", "qexport.passes.metadata"},
    # passes reach calibration only through the Calibrator (no sessions of their own); affine's fit is numerics
    "qexport.passes.transforms": {"qexport.errors", "qexport.passes._ir", "qexport.passes._settings",
                                  "qexport.passes.metadata", "qexport.passes.discovery", "qexport.calibration.calibrator",
                                  "qexport.calibration.affine_fit"},
    "qexport.passes.quantize": {"qexport.errors", "qexport.passes._ir", "qexport.passes._settings",
                                "qexport.passes.metadata", "qexport.passes.discovery", "qexport.calibration.calibrator"},
    "qexport.passes.ort": {"qexport.errors", "qexport.passes._ir", "qexport.passes.metadata",
                           "qexport.passes.discovery", "qexport.passes.quantize"},
    "qexport.calibration": {"qexport.errors", "qexport.runtimes", "qexport.passes._ir", "qexport.passes.metadata",
                            "qexport.passes.discovery"},
    "qexport.calibration.calibrator": {"qexport.errors", "qexport.calibration"},  # what passes may use of calibration
    "qexport.calibration.affine_fit": set(),  # torch numerics of one site: runs no graph
    "qexport.analysis": {"qexport.errors", "qexport.calibration", "qexport.passes.metadata",
                         "qexport.passes.discovery"},
    "qexport.exporter": {"qexport.errors", "qexport.runtimes"},
    "qexport.artifact": {"qexport.errors", "qexport.exporter", "qexport.runtimes", "qexport.runtimes.tensorrt"},
    "qexport.evaluation": {"qexport.errors", "qexport.artifact", "qexport.exporter", "qexport.runtimes"},
    "qexport.recipes": {"qexport.errors", "qexport.passes", "qexport.calibration", "qexport.analysis",
                        "qexport.runtimes", "qexport.runtimes.tensorrt"},
    "qexport.report": {"qexport.errors", "qexport.recipes", "qexport.evaluation", "qexport.artifact",
                       "qexport.exporter", "qexport.calibration", "qexport.analysis", "qexport.passes",
                       "qexport.runtimes"},
    "qexport.api": {"qexport.errors", "qexport.recipes", "qexport.exporter", "qexport.artifact",
                    "qexport.evaluation", "qexport.runtimes"},
    "qexport.cli": {"qexport.errors", "qexport.api", "qexport.artifact", "qexport.evaluation", "qexport.report",
                    "qexport.analysis", "qexport.runtimes", "qexport.exporter", "qexport.recipes"},
    "qexport": {"qexport.api", "qexport.evaluation"},
}
# Leaf modules every area may import (they import no other qexport module).
SHARED = {"qexport.numerics", "qexport.tensors"}
# Sub-areas a wider entry stands for ("qexport.passes" in ALLOWED covers all its sub-packages).
WIDE = {"qexport.passes": ("qexport.passes.",), "qexport.runtimes": ("qexport.runtimes.",),
        "qexport.calibration": ("qexport.calibration.",)}
# Heavy third-party imports, by the areas that may make them.
THIRD_PARTY = {"torch": {"qexport.exporter", "qexport.calibration.affine_fit", "qexport.evaluation",
                         "qexport.runtimes.torch_runner", "qexport.runtimes.tensorrt"}}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [FOLDERS[rel.parts[0]], *rel.with_suffix("").parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def area_of(module: str) -> str:
    best = max((a for a in ALLOWED if module == a or module.startswith(a + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"{module} is in no area of the import rules; add it to ALLOWED")
    return best


def imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every import outside ``if TYPE_CHECKING:`` blocks, relative imports resolved by caller."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def violations(module: str, source: str) -> list[str]:
    own = area_of(module)
    allowed = ALLOWED[own]
    out = []
    for line, target in imports(ast.parse(source)):
        top = target.split(".")[0]
        if top in THIRD_PARTY:
            if not any(module == a or module.startswith(a + ".") for a in THIRD_PARTY[top]):
                out.append(f"{module}:{line} imports {top}, which only {sorted(THIRD_PARTY[top])} may import")
            continue
        if top != "qexport" or target == "qexport.__version__":
            continue
        # "from qexport.passes.discovery import sites" names the module qexport.passes.discovery.sites;
        # "from qexport.errors import QexportError" names qexport.errors: the area decides either way.
        try:
            theirs = area_of(target)
        except AssertionError:
            theirs = area_of(target.rpartition(".")[0])
        if theirs == own or theirs in allowed or theirs in SHARED:
            continue
        if any(theirs.startswith(p) for wide in allowed for p in WIDE.get(wide, ())):
            continue
        out.append(f"{module}:{line} imports {target} ({theirs}); {own} may import only {sorted(allowed) or 'nothing'}")
    return out


def package_modules() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def test_every_import_follows_the_layering():
    found = [v for path in package_modules() for v in violations(module_name(path), path.read_text())]
    assert not found, "imports against the layering:\n" + "\n".join(found)


@pytest.mark.parametrize("module, source, expected", [
    ("qexport.passes.transforms.fold_norm", "from qexport.recipes.pipeline import apply_recipe",
     "qexport.passes.transforms may import only"),
    ("qexport.runtimes.ort", "def f():\n    from qexport.exporter.graph_export import export_graph",
     "qexport.runtimes may import only"),
    ("qexport.runtimes.causal_lm", "import torch", "imports torch"),
    ("qexport.passes.discovery.sites", "from qexport.passes.transforms import smooth", "qexport.passes.discovery"),
    ("qexport.passes.quantize.bias_correction", "def f():\n    from qexport.calibration.stats import ValueSession",
     "qexport.passes.quantize may import only"),
    ("qexport.passes.transforms.aqas", "from qexport.calibration import layer_sessions", "(qexport.calibration)"),
])
def test_a_deliberate_violation_is_caught(module, source, expected):
    found = violations(module, textwrap.dedent(source))
    assert len(found) == 1 and expected in found[0], found


def test_passes_reach_calibration_through_the_calibrator():
    source = "from qexport.calibration.calibrator import CalibrationStats, Calibrator\n"
    assert violations("qexport.passes.quantize.gptq", source) == violations("qexport.passes.transforms.smooth", source) == []
    assert violations("qexport.passes.ort.int8", source)  # the lowerings run no calibration at all


def test_type_only_imports_are_not_dependencies():
    source = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from qexport.recipes.pipeline import x\n"
    assert violations("qexport.passes._ir", source) == []
