"""The repository documents itself: README.md and openapi.yaml are what a user has."""

from __future__ import annotations

import re

import pytest

from conftest import ROOT

DOCUMENTS = ["README.md", "openapi.yaml", "server.py", "BENCHMARKS.md"]


@pytest.mark.parametrize("name", DOCUMENTS)
def test_no_document_refers_to_a_file_outside_the_repository(name: str) -> None:
    text = (ROOT / name).read_text(encoding="utf-8")
    assert "CONTRACT" not in text
    if name.endswith(".py"):  # code: every document it names is in the repository
        targets = re.findall(r"\b[\w-]+\.(?:md|yaml|html)\b", text)
    else:  # every file a Markdown link points to is in the repository
        targets = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text)
    for target in targets:
        assert (ROOT / target).exists(), f"{name} links to {target}, which is not in the repository"
