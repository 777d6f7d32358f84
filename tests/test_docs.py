"""The documentation stays true to the repository: every relative link resolves and every `mu0` name a Python
snippet imports exists."""

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
IMPORT = re.compile(r"^\s*from (mu0[\w.]*) import ([\w, ]+)$", re.MULTILINE)


def test_docs_exist_and_the_readme_links_each_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    names = {page.name for page in PAGES[1:]}
    assert {"concepts.md", "quickstart.md", "extracting.md", "training.md", "adapting.md", "troubleshooting.md"} <= names
    assert all(f"(docs/{name})" in readme for name in names)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_relative_links_point_to_existing_files(page):
    text = page.read_text(encoding="utf-8")
    targets = [target for target in LINK.findall(text) if not re.match(r"^[a-z]+:", target) and not target.startswith("#")]
    missing = [target for target in targets if not (page.parent / target.split("#")[0]).exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_imported_names_exist(page):
    snippets = "\n".join(re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.DOTALL))
    for module_name, names in IMPORT.findall(snippets):
        module = importlib.import_module(module_name)
        for name in (name.strip() for name in names.split(",")):
            assert hasattr(module, name), f"{page.name}: {module_name} has no {name}"
