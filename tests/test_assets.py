"""The one package locator and the files shipped in edlm.assets."""

import json
from pathlib import Path

import pytest

import edlm
from edlm.assets import ASSETS_DIR, builtin_corpus, package_dir, require_package_dir
from edlm.errors import EdlmError


def test_package_dir_locates_without_importing(monkeypatch):
    assert package_dir("edlm") == Path(edlm.__file__).parent
    assert package_dir("edlm_no_such_package") is None
    assert package_dir("json") is not None and package_dir("json.decoder") is None  # a module is not a folder
    with pytest.raises(EdlmError, match="pip install it"):
        require_package_dir("edlm_no_such_package", "pip install it")


def test_bundled_corpus_is_in_the_assets_folder():
    (path,) = builtin_corpus("tiny")
    assert path.parent == ASSETS_DIR and json.loads(path.read_text().splitlines()[0])["text"]
    assert (ASSETS_DIR / "miniature" / "headline.yaml").is_file()
