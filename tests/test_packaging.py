"""The wheel that ``pip install .`` builds ships every subpackage (a wheel once shipped without
``ppo_fast/trainer``), with the kernels under ``ppo_fast/kernels`` and the C++ sources under
``ppo_fast/csrc``. The full install of that
wheel into a fresh environment, run from outside the source tree, is a step of ``.ci/run``."""

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
