"""The install on the platforms users have: for Linux x86-64 and macOS arm64, ask the package index
which wheels ``pip install -e ".[cpu]"`` would bring, without installing anything.

pip evaluates environment markers for the interpreter that runs it, even with ``--platform``; so the
markers of setup.cfg are evaluated here for each target, and pip resolves the result for the target's
wheel tags. Needs the package index (as the README's install does); about 25 s a platform.
"""

import configparser
import json
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PLATFORMS = {  # name: (wheel tags pip may take, the markers' environment, the oldest Python we support)
    "linux-x86_64": (["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
                      "manylinux2014_x86_64"], {"sys_platform": "linux", "platform_system": "Linux"}, "3.10"),
    "macos-arm64": (["macosx_14_0_arm64"], {"sys_platform": "darwin", "platform_system": "Darwin"}, "3.11"),
}


def requirements(extra: str, environment: dict, python: str) -> list:
    """setup.cfg's install_requires and ``extra``, with their markers evaluated for ``environment``."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options"]["install_requires"].splitlines() + config["options.extras_require"][extra].splitlines()
    chosen = []
    for line in filter(None, (line.strip() for line in lines)):
        requirement = Requirement(line)
        marker_env = {**environment, "python_version": python, "python_full_version": f"{python}.0"}
        if requirement.marker is None or requirement.marker.evaluate(marker_env):
            requirement.marker = None
            chosen.append(str(requirement))
    return chosen


def resolve(tags: list, python: str, wanted: list, tmp_path) -> dict:
    """{name: wheel file name} that pip would install for ``wanted`` on ``tags``, or a failed test."""
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--target", str(tmp_path / "never-written"), "--only-binary=:all:", "--python-version", python,
               "--implementation", "cp", "--report", str(report), *[f"--platform={tag}" for tag in tags], *wanted]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"pip cannot resolve {wanted} for {tags}:\n{result.stderr[-2000:]}"
    return {canonicalize_name(item["metadata"]["name"]): item["download_info"]["url"].rsplit("/", 1)[-1]
            for item in json.loads(report.read_text())["install"]}


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_cpu_extra_resolves_to_wheels_of_each_platform(platform, tmp_path):
    tags, environment, python = PLATFORMS[platform]
    wanted = requirements("cpu", environment, python)
    tensorflow = "tensorflow-cpu" if platform.startswith("linux") else "tensorflow"
    assert any(line.startswith(tensorflow + ">=") for line in wanted), wanted
    wheels = resolve(tags, python, wanted, tmp_path)
    assert tensorflow in wheels and "keras" in wheels and "opencv-python-headless" in wheels
    platform_tag = "manylinux" if platform.startswith("linux") else "macosx"
    assert platform_tag in wheels[tensorflow] and f"cp{python.replace('.', '')}" in wheels[tensorflow]
    assert wheels["keras"].startswith("keras-3.15.")  # the Keras version kcifar is tested with
