"""qevo's install: it builds the oneDNN bridge, or says why not and installs all the same."""

import os
import pathlib
import platform
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not (sys.platform == "linux" and platform.machine() == "x86_64"),
                    reason="oneDNN's wheel is installed on x86-64 Linux only")
def test_a_wheel_built_without_a_compiler_says_why_and_keeps_the_python_package(tmp_path):
    """``CXX=/bin/false pip wheel .``: the build succeeds, prints one line naming the missing
    compiler, and the wheel holds qevo without the bridge and with that reason for
    ``qevo.onednn_status()``."""
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                          env={**os.environ, "CXX": "/bin/false"}, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    said = [line.strip() for line in (done.stdout + done.stderr).splitlines() if "qevo: oneDNN" in line]
    assert len(said) == 1 and "no working C++ compiler" in said[0], said
    (wheel,) = tmp_path.glob("qevo-*-py3-none-linux_x86_64.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert {"qevo/__init__.py", "qevo/quant/onednn.py", "qevo/onednn_build.txt"} <= names
        assert "qevo/libqevo_onednn.so" not in names
        assert z.read("qevo/onednn_build.txt").decode().startswith("no working C++ compiler")
