"""Every ```python block in docs/*.md runs (blocks of one file share a namespace)."""
import pathlib
import re
import runpy

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def doc_files():
    return sorted(p for p in DOCS.glob("*.md") if BLOCK.search(p.read_text()))


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.name)
def test_doc_examples_run(path, tmp_path, monkeypatch):
    """The blocks run as one real module file (Numba's cache needs a file on disk)."""
    monkeypatch.chdir(tmp_path)
    blocks = BLOCK.findall(path.read_text())
    assert blocks
    script = tmp_path / f"doc_{path.stem}.py"
    script.write_text("\n".join(f"# --- {path.name}, block {i}\n{code}" for i, code in enumerate(blocks)))
    runpy.run_path(str(script), run_name=f"doc_{path.stem}")


def test_experiment_reference_is_generated_from_the_schema():
    from rabbitkit.train.config import schema_markdown

    assert schema_markdown() in (DOCS / "experiments.md").read_text(), \
        "docs/experiments.md is stale: regenerate its key reference from rabbitkit.train.config.schema_markdown()"
