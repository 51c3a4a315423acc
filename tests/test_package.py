"""The layout: the root holds the Hub repository's files, the tools are the installable ``videonsa`` package with
its console scripts, and nothing edits ``sys.path`` to find them."""

import re
import subprocess
import sys
import tomllib
from importlib import import_module
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]


def test_console_scripts_name_callables_and_explain_themselves(capsys, monkeypatch):
    assert set(SCRIPTS) == {"videonsa-demo", "videonsa-train", "videonsa-analyze", "videonsa-push"}
    for name, target in SCRIPTS.items():
        module, function = target.split(":")
        entry = getattr(import_module(module), function)
        monkeypatch.setattr(sys, "argv", [name, "--help"])
        with pytest.raises(SystemExit) as exit_info:
            entry()
        assert exit_info.value.code == 0, name
        assert "usage:" in capsys.readouterr().out, name


def test_the_root_modules_are_the_hub_files_and_the_package_installs_them():
    root_modules = sorted(p.stem for p in ROOT.glob("*.py") if p.name != "push_to_hub.py")
    assert sorted(PYPROJECT["tool"]["setuptools"]["py-modules"]) == root_modules
    assert not (ROOT / "train.py").exists() and not list(ROOT.glob("videonsa_*.py"))


def test_no_code_edits_sys_path():
    offenders = []
    for path in [*ROOT.glob("*.py"), *ROOT.glob("videonsa/**/*.py"), *ROOT.glob("bench/*.py")]:
        if re.search(r"sys\.path\.(insert|append)|sys\.path\s*\+?=", path.read_text()):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_push_to_hub_runs_as_a_script_from_anywhere(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "push_to_hub.py"), "--help"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--dry-run" in result.stdout
