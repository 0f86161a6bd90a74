"""The layout's one hard boundary: qprompt/deploy/ (and the helpers it uses) imports nothing of the training side.

Read from the source (every import statement, those inside functions too), so an import that only runs on a rare
path is caught as surely as one at the top; tests/test_torch_free.py runs the deploy commands with torch blocked.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

import qprompt

PACKAGE = Path(qprompt.__file__).parent
ROOT = PACKAGE.parent
# The torch-free helpers the deploy side may use besides its own package.
SHARED = {"qprompt.errors", "qprompt.templates", "qprompt.metrics", "qprompt.owned"}
# Import names of the plain install's packages (pyproject's dependencies) and of the genai/gpu extras.
IMPORT_NAMES = {"onnxruntime": "onnxruntime", "numpy": "numpy", "tokenizers": "tokenizers", "click": "click",
                "pyyaml": "yaml", "filelock": "filelock", "starlette": "starlette", "uvicorn": "uvicorn",
                "onnxruntime-genai": "onnxruntime_genai", "onnxruntime-gpu": "onnxruntime"}


def imports(path: Path, module: str) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved against `module`)."""
    names = set()
    package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in all_modules())
    return names


def all_modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def allowed_third_party() -> set[str]:
    """Import names of what the installed qprompt declares for the plain install and the genai/gpu extras."""
    names = set()
    for requirement in importlib.metadata.requires("qprompt"):
        spec, _, marker = requirement.partition(";")
        if not marker or re.search(r"extra == .(genai|gpu).", marker):
            names.add(re.split(r"[<>=!~\[ ]", spec.strip())[0])
    assert names <= set(IMPORT_NAMES), f"a new dependency: add its import name to IMPORT_NAMES: {names}"
    return {IMPORT_NAMES[n] for n in names}


def test_the_deploy_package_imports_nothing_of_the_training_side():
    modules = all_modules()
    third_party = allowed_third_party()
    deploy = {name for name in modules if name == "qprompt.deploy" or name.startswith("qprompt.deploy.")}
    assert {"qprompt.deploy.runtime", "qprompt.deploy.serve", "qprompt.deploy.manifest"} <= deploy
    bad = []
    for name in sorted(deploy | SHARED):
        for imported in sorted(imports(modules[name], name)):
            top = imported.split(".")[0]
            if top == "qprompt":
                if imported != "qprompt" and imported not in deploy | SHARED:
                    bad.append(f"{name} imports {imported}")
            elif top not in sys.stdlib_module_names and top not in third_party:
                bad.append(f"{name} imports {imported} (not in the plain install)")
    assert bad == []


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    """The rule is not blind to lazy imports: one torch import in a function body is found."""
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from ..models import load_model\n    import torch\n")
    assert {"qprompt.models", "torch"} <= imports(path, "qprompt.deploy.probe")
