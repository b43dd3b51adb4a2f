"""The package as a user installs it: the wheel built from this checkout, in a fresh venv.

The venv holds the wheel alone (``--no-deps``); its dependencies are reached through a path
line to this venv's site-packages, because installing dagster from the index takes minutes. The
package itself must come from the wheel (checked by its ``__file__``), not from this checkout.
"""

from __future__ import annotations

import ast
import email
import os
import re
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

import dagster_taskiq_cancel

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "dagster_taskiq_cancel"
PUBLIC = (
    "TaskiqCancelResource",
    "TaskiqRunLauncher",
    "taskiq_executor",
    "cancel_reconciliation_sensor",
    "cancellation_requested",
    "cancel_runs",
)
# Names newer than the floor of requires-python (3.10), by module.
NEWER_THAN_310 = {
    "typing": {"Self", "Never", "LiteralString", "assert_never", "reveal_type", "override"},
    "datetime": {"UTC"},
    "asyncio": {"timeout", "timeout_at", "TaskGroup", "Runner"},
    "enum": {"StrEnum", "ReprEnum", "verify"},
    "contextlib": {"chdir"},
    "itertools": {"batched"},
}
NEWER_MODULES = {"tomllib"}
NEWER_BUILTINS = {"ExceptionGroup", "BaseExceptionGroup"}


def outside_checkout() -> dict[str, str]:
    """The environment without PYTHONPATH, so that nothing reaches this checkout's code."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)],
        check=True,
        env=outside_checkout(),
        timeout=300,
    )
    (built,) = out.glob("*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps"]
    subprocess.run([*pip, str(wheel)], check=True, env=outside_checkout(), timeout=300)
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # A plain path line: the editable install's own .pth files there are not processed.
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    yield root


def test_the_wheel_imports_its_public_names_from_a_fresh_venv(venv: Path, tmp_path: Path) -> None:
    code = (
        "import dagster_taskiq_cancel as p; "
        f"[getattr(p, name) for name in {PUBLIC!r}]; "
        "print(p.__file__)"
    )
    found = in_venv(tmp_path, venv / "bin" / "python", "-c", code)
    assert Path(found.strip()).is_relative_to(venv), found
    version = in_venv(tmp_path, venv / "bin" / "dagster-taskiq-cancel", "--version")
    assert version.split()[-1] == dagster_taskiq_cancel.__version__


def in_venv(cwd: Path, program: Path, *args: str) -> str:
    """The output of ``program`` run away from this checkout; it must succeed."""
    done = subprocess.run(
        [str(program), *args],
        cwd=cwd,
        env=outside_checkout(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_wheel_is_typed_and_declares_every_import(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_bytes(archive.read(metadata_name))
    assert "dagster_taskiq_cancel/py.typed" in names
    assert not [n for n in names if n.startswith("dagster_taskiq_cancel_tests/")]
    assert set(metadata["Requires-Python"].split(",")) == {">=3.10", "<3.15"}
    assert metadata["Version"] == dagster_taskiq_cancel.__version__
    core = {
        re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0].lower().replace("_", "-")
        for requirement in metadata.get_all("Requires-Dist")
        if "extra ==" not in requirement
    }
    distributions = packages_distributions()
    undeclared = {}
    for module in sorted(imported_modules()):
        if module in sys.stdlib_module_names or module == "dagster_taskiq_cancel":
            continue
        owners = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not owners & core:
            undeclared[module] = sorted(owners)
    assert not undeclared, f"imported but not in dependencies: {undeclared}"


def imported_modules() -> set[str]:
    """The top-level module of every import in the package."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


def test_the_code_uses_nothing_newer_than_python_3_10() -> None:
    newer = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        tree = ast.parse(text, feature_version=(3, 10))
        where = path.relative_to(REPO)
        # asyncio.wait_for raises asyncio.TimeoutError, which is not the builtin before 3.11.
        builtins = NEWER_BUILTINS | ({"TimeoutError"} if "asyncio.wait_for" in text else set())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in NEWER_THAN_310:
                names = {alias.name for alias in node.names} & NEWER_THAN_310[node.module]
                newer += [f"{where}: {node.module}.{name}" for name in sorted(names)]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                if node.attr in NEWER_THAN_310.get(node.value.id, ()):
                    newer.append(f"{where}: {node.value.id}.{node.attr}")
            elif isinstance(node, ast.Import | ast.ImportFrom):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                modules += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
                newer += [f"{where}: {m}" for m in modules if m in NEWER_MODULES]
            elif isinstance(node, ast.Name) and node.id in builtins:
                newer.append(f"{where}: {node.id}")
    assert not newer, f"not in Python 3.10: {newer}"
