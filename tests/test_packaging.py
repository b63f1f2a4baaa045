"""A wheel of the repository installs a frontend that serves the web UI."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_wheel(tmp_path: Path) -> Path:
    """Build a wheel from the tracked files alone, as a clone would have them."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    source = tmp_path / "source"
    for name in tracked:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")],
                   cwd=source, check=True, capture_output=True, timeout=120)
    return next((tmp_path / "dist").glob("*.whl"))


def test_the_wheel_carries_the_web_ui_and_the_installed_app_finds_it(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    static = sorted(p.relative_to(REPO / "static").as_posix()
                    for p in (REPO / "static").rglob("*") if p.is_file())
    with zipfile.ZipFile(wheel) as archive:
        packaged = sorted(name.removeprefix("http_frontend/static/")
                          for name in archive.namelist()
                          if name.startswith("http_frontend/static/"))
    assert packaged == static

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, timeout=120)
    code = ("import http_frontend.app as app; "
            "print(app.STATIC_DIR, (app.STATIC_DIR / 'index.html').is_file())")
    # The installed copy first on the path, the checkout nowhere on it.
    found = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60, env={"PYTHONPATH": str(target),
                                                       "HF_HUB_OFFLINE": "1"})
    assert found.returncode == 0, found.stderr
    directory, has_index = found.stdout.split()
    assert Path(directory) == target / "http_frontend" / "static" and has_index == "True"
