"""The wheel that ``pip install .`` builds ships every subpackage (a wheel once shipped without
``ppo_fast/trainer``), with the kernels under ``ppo_fast/kernels`` and the C++ sources under
``ppo_fast/csrc``. The full install of that
wheel into a fresh environment, run from outside the source tree, is a step of ``.ci/run``. No
module of the package imports, at the top or inside a function, one that imports it back."""

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_every_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("ppo_fast-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    sources = [p.relative_to(ROOT).as_posix() for p in (ROOT / "ppo_fast").rglob("*.py")]
    sources += ["ppo_fast/kernels/" + p.relative_to(ROOT / "kernels").as_posix()
                for p in (ROOT / "kernels").rglob("*.py")]
    # The native kernels' C++ sources, which an installed wheel builds on first use.
    sources += ["ppo_fast/csrc/" + p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".py", ".cpp")]
    missing = sorted(s for s in sources if s not in shipped and "__pycache__" not in s)
    assert not missing, f"the wheel lacks {missing}"
    assert not any(name.startswith(("kernels/", "csrc/", "tests/", "benches/")) for name in shipped)


def _from_root(*args):
    """Runs python from the repository root, where `python -m`/`-c` put the root first on sys.path."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)


def test_the_root_kernels_folder_never_stands_in_for_the_pypi_kernels_package():
    # transformers >= 5.25 imports the PyPI package `kernels`; from the root, our kernels/ folder
    # used to be imported in its place and every transformers model import failed.
    import importlib.metadata

    real = importlib.metadata.distribution("kernels")
    run = _from_root("-c", "import kernels, transformers.modeling_utils; print(kernels.__file__)")
    assert run.returncode == 0, run.stderr
    imported = Path(run.stdout.strip()).resolve()
    assert imported == Path(real.locate_file("kernels/__init__.py")).resolve()


def test_from_the_root_the_cli_and_the_triton_kernels_still_import():
    run = _from_root("-m", "ppo_fast.cli", "--help")
    assert run.returncode == 0, run.stderr
    run = _from_root("-c", "import ppo_fast.kernels.logprobs as k; print(k.__file__)")
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.strip()).resolve() == ROOT / "kernels" / "logprobs.py"


def _imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """The package's modules that ``module`` (in ``path``) imports anywhere in its text."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            # `from . import x` imports the submodule x, not the package around it.
            named = {f"{target}.{alias.name}" for alias in node.names} & modules
            found |= named or ({target} & modules)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names} & modules
    return found - {module}


def test_no_import_circles():
    files = {}
    for path in (ROOT / "ppo_fast").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {module: _imports(path, module, set(files)) for module, path in files.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            module = todo.pop()
            if module == goal:
                return True
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])
        return False

    circles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if reaches(b, a)})
    assert not circles, f"modules that import each other (directly or through others): {circles}"
