"""Runs a tools/ script inside tools/.work/venv, creating the venv and pip-installing what the
script needs on first use, so the comparisons need nothing installed by hand."""

import os
import subprocess
import sys
from pathlib import Path

VENV = Path(__file__).resolve().parent / ".work" / "venv"
MARKER = "VITRINE_TOOLS_IN_VENV"


def ensure(modules, packages, note=""):
    """Returns if every module in `modules` imports here; otherwise re-executes the calling
    script inside the venv, pip-installing `packages` there first if they are missing."""
    try:
        for m in modules:
            __import__(m)
        return
    except ImportError:
        pass
    py = VENV / "bin" / "python"
    if os.environ.get(MARKER):
        sys.exit(f"{', '.join(modules)} still missing inside {VENV}; see the pip output above")
    if not py.exists():
        print(f"creating venv {VENV}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    probe = subprocess.run([str(py), "-c", "import " + ", ".join(modules)], capture_output=True)
    if probe.returncode != 0:
        print(f"installing {' '.join(packages)} into the venv{note}", file=sys.stderr)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *packages], check=True)
    env = dict(os.environ, **{MARKER: "1"})
    script = Path(sys.argv[0]).resolve()
    os.execve(str(py), [str(py), str(script), *sys.argv[1:]], env)
