"""The peer projects whose behaviour our adapters promise, loaded as the tests' oracle.

They are real packages, installed by the README's test command (verl and OpenRLHF with
``--no-deps``: their pins exclude our transformers). A missing peer fails the tests that need it;
it is never skipped, so a green run always means the comparison ran.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def verl(module: str) -> types.ModuleType:
    """A module of the installed verl, e.g. ``verl("trainer.ppo.core_algos")``."""
    return importlib.import_module(f"verl.{module}")


def _openrlhf_root() -> str:
    loaded = sys.modules.get("openrlhf")
    if loaded is not None and getattr(loaded, "__path__", None):
        return list(loaded.__path__)[0]
    spec = importlib.util.find_spec("openrlhf")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("openrlhf is not installed: run the README's test command "
                                  "(pip install --no-deps openrlhf==0.11.2)")
    return list(spec.submodule_search_locations)[0]


def openrlhf(module: str) -> types.ModuleType:
    """``openrlhf.models.<module>`` (``utils`` or ``loss``) from the installed OpenRLHF.

    The package's ``openrlhf/models/__init__.py`` imports the actor, which needs flash-attn, so
    the two modules are loaded from their files under an empty ``openrlhf.models`` package.
    """
    name = f"openrlhf.models.{module}"
    if name in sys.modules:
        return sys.modules[name]
    root = _openrlhf_root()
    for package, path in (("openrlhf", root), ("openrlhf.models", f"{root}/models")):
        if package not in sys.modules or not hasattr(sys.modules[package], "__path__"):
            stub = types.ModuleType(package)
            stub.__path__ = [path]
            sys.modules[package] = stub
    if module == "loss":
        openrlhf("utils")
    file_spec = importlib.util.spec_from_file_location(name, f"{root}/models/{module}.py")
    loaded = importlib.util.module_from_spec(file_spec)
    sys.modules[name] = loaded
    file_spec.loader.exec_module(loaded)
    return loaded
