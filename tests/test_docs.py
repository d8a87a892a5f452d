"""Every ```python block in docs/*.md runs (blocks of one file share a namespace)."""
import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def doc_files():
    return sorted(p for p in DOCS.glob("*.md") if BLOCK.search(p.read_text()))


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.name)
def test_doc_examples_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"doc_{path.stem}"}
    blocks = BLOCK.findall(path.read_text())
    assert blocks
    for index, code in enumerate(blocks):
        try:
            exec(compile(code, f"{path.name}[block {index}]", "exec"), namespace)
        except Exception as err:  # report which block failed
            raise AssertionError(f"{path.name} block {index} failed: {err!r}") from err
