"""No module under ``tests/`` imports a test module: shared code lives in ``tests/harness``.

Importing a ``test_*`` module runs its module-level code again, registers its
fixtures in another module, and ties one tier's selection (``-m unit``, a single
file, an xdist worker) to another's. Helpers, constants and dataclasses that more
than one test module uses belong in ``tests/harness/``; shared fixtures in the
tier's ``conftest.py`` (``tests/conftest.py`` when tiers share them).
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def imported_test_modules(path: Path, root: Path = TESTS) -> list[str]:
    """``line: module`` for every import in ``path`` that names a ``test_*`` module.

    Covers ``import a.test_x``, ``from a.test_x import y``, ``from a import test_x``
    and relative imports (resolved against ``path``'s package under ``root``), at any
    depth in the file.
    """
    package = list(path.relative_to(root.parent).parent.parts)
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            candidates = [module, *(f"{module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in candidates:
            if any(part.startswith("test_") for part in name.split(".")):
                found.append((node.lineno, name))
                break
    return [f"{line}: {name}" for line, name in sorted(found)]


def test_no_module_under_tests_imports_a_test_module() -> None:
    offenders = {
        str(path.relative_to(TESTS.parent)): imported_test_modules(path)
        for path in sorted(TESTS.rglob("*.py"))
    }
    assert {path: lines for path, lines in offenders.items() if lines} == {}


def test_the_scan_sees_every_form_of_importing_a_test_module(tmp_path: Path) -> None:
    tier = tmp_path / "tests" / "unit"
    tier.mkdir(parents=True)
    sample = tier / "test_sample.py"
    sample.write_text(
        "import os\n"
        "from tests.harness.procs import Processes\n"
        "import tests.unit.test_a\n"
        "from tests.integration.test_b import helper\n"
        "from tests.e2e import test_c as _c\n"
        "def f():\n"
        "    from .test_d import thing\n"
        "    from . import conftest, test_e\n"
    )
    assert imported_test_modules(sample, tmp_path / "tests") == [
        "3: tests.unit.test_a",
        "4: tests.integration.test_b",
        "5: tests.e2e.test_c",
        "7: tests.unit.test_d",
        "8: tests.unit.test_e",
    ]
