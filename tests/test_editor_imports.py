"""An editor can follow `lodestar.*` imports to the repository's files.

pyproject.toml maps top-level folders (orchestrator/, workers/, ...) onto `lodestar.*`. A lenient
editable install (plain `pip install -e .`) serves that mapping through an import hook that static
tools (jedi, pyright/Pylance) cannot see, so go-to-definition finds nothing. The strict editable
install that the README's "Set up" command makes instead puts a tree of links (build/__editable__.*)
on sys.path through a .pth file, which static tools read. jedi here stands in for the editor: it
reads the venv's sys.path (in a subprocess of that interpreter) and resolves without importing.
"""

import importlib.util
import os
import sys
import tomllib
from pathlib import Path

import jedi
import pytest

ROOT = Path(__file__).resolve().parents[1]

FIX = (
    "re-run the README's install command (needed after adding a module too): "
    ".venv/bin/pip install -e '.[dev]' --config-settings editable_mode=strict"
)
NOT_STRICT = "is `lodestar` installed editable but not strict (an import hook editors cannot see)?"


@pytest.mark.parametrize(
    ("module", "name", "expected"),
    [
        ("lodestar.orchestrator.driver", "Orchestrator", "orchestrator/driver.py"),
        ("lodestar.workers.messages", "ExtendRequest", "workers/messages.py"),
    ],
)
def test_import_resolves_to_the_repository_file(module: str, name: str, expected: str) -> None:
    code = f"from {module} import {name}"
    environment = jedi.create_environment(sys.executable, safe=False)
    script = jedi.Script(code, path=ROOT / "tests" / "_editor_probe.py", environment=environment)
    column = code.index(name)
    found = script.goto(1, column, follow_imports=True) or script.infer(1, column)
    paths = [os.path.realpath(d.module_path) for d in found if d.module_path is not None]
    assert paths, f"jedi resolves nothing for `{code}`; {NOT_STRICT} Fix: {FIX}"
    assert paths == [os.path.realpath(ROOT / expected)], (
        f"`{code}` resolves to {paths}, not the repository; fix: {FIX}"
    )
    assert found[0].type == "class" and found[0].name == name


def test_the_install_links_every_module() -> None:
    """Strict mode links files at install time: a module added since then is not importable."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = config["package-dir"]
    stale = []
    for package in config["packages"]:
        top = max((p for p in mapping if package == p or package.startswith(p + ".")), key=len)
        folder = ROOT / mapping[top] / Path(*package[len(top) :].split(".")[1:])
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.submodule_search_locations, (
            f"{package} not installed; fix: {FIX}"
        )
        installed = Path(spec.submodule_search_locations[0])
        for source in sorted([*folder.glob("*.py"), *folder.glob("*.pyi")]):
            if not (installed / source.name).exists():
                stale.append(str(source.relative_to(ROOT)))
    assert not stale, f"added since the install, so not importable: {stale}; fix: {FIX}"


def test_the_readme_and_ci_install_in_strict_mode() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    install = "pip install -q -e '.[dev]' --config-settings editable_mode=strict"
    assert install in ci
    assert install.replace(" -q", "") in readme
