"""The package layout: imports run one way (commands -> world -> training/generation -> models -> shared)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sdtune"
# What each layer may import from sdtune (besides itself and the shared top-level modules).
ALLOWED = {
    "shared": set(),
    "models": set(),
    "generation": {"models"},
    "training": {"models"},
    "world": {"models", "generation", "training"},
    "commands": {"models", "generation", "training", "world", "ui"},
    # the web UI sits at the commands level; only sdtune/commands/ui.py imports it
    "ui": {"models", "generation", "training", "world"},
}


def layer(module: str) -> str:
    """'sdtune.models.loading' -> 'models'; top-level modules ('sdtune.errors', 'sdtune') are shared."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else "shared"


def sdtune_imports(path: Path) -> set[str]:
    """Every sdtune module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "sdtune":
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if (PACKAGE.joinpath(*node.module.split(".")[1:], a.name)).is_dir()
                         or PACKAGE.joinpath(*node.module.split(".")[1:], a.name + ".py").is_file())
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; sdtune imports absolutely so the layer is visible")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "sdtune")
    return found


def modules():
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way(path):
    # `python -m sdtune` (__main__) is the command line's other door.
    own = "commands" if path.name == "__main__.py" else layer("sdtune." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
    for imported in sdtune_imports(path):
        other = layer(imported)
        if other in (own, "shared"):
            continue
        assert other in ALLOWED[own], f"{path.relative_to(ROOT)} ({own}) imports {imported} ({other})"


def test_every_package_says_what_it_owns():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc, f"{init.relative_to(ROOT)}: say what it owns and what it may import"


def test_only_the_ui_command_imports_the_ui():
    for path in modules():
        if path.relative_to(PACKAGE).parts[0] in ("ui",) or path == PACKAGE / "commands" / "ui.py":
            continue
        assert not any(layer(m) == "ui" for m in sdtune_imports(path)), f"{path.relative_to(ROOT)} imports sdtune.ui"


def test_import_sdtune_does_not_load_torch():
    code = "import sys, sdtune, sdtune.commands.cli; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
