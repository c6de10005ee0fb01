"""Dependencies run one way: server/ uses tools/, never the reverse (tools/ is the pure core)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_tools_never_import_server():
    offenders = {
        f"{path.relative_to(ROOT)} imports {name}"
        for path in (ROOT / "tools").rglob("*.py")
        for name in imported_modules(path)
        if name == "server" or name.startswith("server.")
    }
    assert not offenders


def test_the_check_sees_a_server_import(tmp_path):
    """The rule above cannot pass vacuously: it finds both import forms."""
    module = tmp_path / "m.py"
    module.write_text("import server.errors\nfrom server.app import create_app\n")
    assert imported_modules(module) == {"server.errors", "server.app"}
