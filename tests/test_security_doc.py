"""docs/SECURITY.md stays true to the code: its references, variables and quoted limits exist and match."""
from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

from core.models.loading import env_var_for
from core.models.registry import MODELS

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "SECURITY.md").read_text()
# `core/config.py:read_token`: a file and a name defined at its top level.
REFERENCE = re.compile(r"`((?:core|app_pages)/[\w/]+\.py):(\w+)`")
# HF_TOKEN, DASH_MODEL_<KEY>, STREAMLIT_SERVER_ENABLE_CORS ... (not TORCHVISION_HUB_REPO, a constant)
VARIABLE = re.compile(r"\b((?:DASH|HF|HUGGING_FACE|STREAMLIT|TORCH)_[A-Z0-9_]*[A-Z0-9](?:_<KEY>)?)")


def top_level(path: Path) -> dict[str, ast.AST]:
    """Functions, classes and assigned constants at the top level of a module, by name."""
    names: dict[str, ast.AST] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        names[name.id] = node.value
    return names


def constant(module: str, name: str) -> object:
    return ast.literal_eval(top_level(ROOT / module)[name])


def test_every_code_reference_names_something_that_exists():
    references = REFERENCE.findall(DOC)
    assert len(references) >= 20  # the doc cites code throughout; a broken pattern must not pass by finding nothing
    missing = [f"{path}:{name}" for path, name in references if not (ROOT / path).is_file() or name not in top_level(ROOT / path)]
    assert not missing, missing


def test_every_variable_it_names_is_one_the_project_reads_or_sets():
    known = (ROOT / "README.md").read_text() + (ROOT / "Dockerfile").read_text()
    known += "".join(path.read_text() for path in [*(ROOT / "core").rglob("*.py"), *(ROOT / "deploy").iterdir()])
    known += " ".join(env_var_for(spec) for spec in MODELS.values())  # DASH_MODEL_RESNET50 and the others
    named = set(VARIABLE.findall(DOC))
    assert {"HF_TOKEN", "DASH_MODELS_ROOT", "STREAMLIT_SERVER_ENABLE_XSRF_PROTECTION"} <= named
    assert not sorted(variable for variable in named if variable not in known)


def test_every_dash_setting_the_code_reads_has_its_security_meaning():
    read = set()
    for path in (ROOT / "core").rglob("*.py"):
        read |= set(re.findall(r"\"(DASH_[A-Z_]*)\"", path.read_text()))
    read = {"DASH_MODEL_<KEY>" if name == "DASH_MODEL_" else name for name in read}
    assert {"DASH_MODELS_ROOT", "DASH_EVICT_TO", "DASH_MODEL_<KEY>"} <= read
    table = DOC.split("## Settings an operator may change", 1)[1].split("\n## ", 1)[0]
    assert not sorted(name for name in read if f"`{name}`" not in table)


def test_quoted_limits_and_pins_match_the_code():
    assert f"`MAX_PIXELS` = {constant('core/tasks/images.py', 'MAX_PIXELS'):,} pixels" in DOC
    assert f"`{constant('core/models/registry.py', 'TORCHVISION_HUB_REPO')}`" in DOC
    assert f"({constant('core/tasks/sentiment.py', 'MAX_LINES'):,} typed lines)" in DOC
    assert f"{constant('core/tasks/sentiment.py', 'MAX_CHARS'):,} characters" in DOC
    with (ROOT / ".streamlit" / "config.toml").open("rb") as handle:
        server = tomllib.load(handle)["server"]
    assert f"{server['maxUploadSize']} in `.streamlit/config.toml`" in DOC
    assert server["enableXsrfProtection"] is True and "`enableXsrfProtection = true`" in DOC
