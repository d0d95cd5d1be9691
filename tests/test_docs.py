"""Every ```python block of README.md and docs/*.md runs as written (blocks of one file share a
namespace, in order), so the examples users copy never drift from the code."""
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(REPO, "docs"))
                               if f.endswith(".md"))


def _blocks(path):
    text = open(os.path.join(REPO, path), encoding="utf-8").read()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


@pytest.mark.parametrize("path", FILES)
def test_python_blocks_run(path, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    blocks = _blocks(path)
    if not blocks:
        pytest.skip(f"{path} has no python blocks")
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": "__docs__"}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{path} block {i + 1}", "exec"), ns)
        except Exception as e:  # noqa: BLE001 -- report which block broke
            raise AssertionError(f"{path}, python block {i + 1} fails: {type(e).__name__}: {e}") from e
