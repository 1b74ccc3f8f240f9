"""The documentation's code runs: the README's ```python blocks in order in one namespace, and the
```python blocks of each docs/*.md page the same way (one namespace per page), in a temporary
working folder with ``HF_HUB_OFFLINE=1``.

A block that is not meant to run (a fragment using the reader's own names, a signature, an
example needing model weights) opts out with ``<!-- skip-test -->`` on the line right before its
fence (docs/architecture.md, section 6).
"""

from __future__ import annotations

import os
import re
import time
import warnings
from typing import List, NamedTuple

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = "<!-- skip-test -->"
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")
SECONDS_PER_BLOCK = 20.0  # one runnable block's budget (the README's takes 4-7 s on 2 cores)


class Block(NamedTuple):
    line: int  # 1-based line of the first code line
    code: str
    skip: bool


def python_blocks(path: str) -> List[Block]:
    """The top-level ```python blocks of a Markdown file (fences nested in a longer fence, or
    indented, are content of the outer block)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(1), m.group(2)
        end = i + 1
        while end < len(lines) and not re.match(rf"^{re.escape(fence)}\s*$", lines[end]):
            end += 1
        if lang == "python":
            skip = i > 0 and lines[i - 1].strip() == SKIP
            blocks.append(Block(i + 2, "\n".join(lines[i + 1 : end]) + "\n", skip))
        i = end + 1
    return blocks


def run_blocks(path: str, blocks: List[Block]) -> None:
    """Execute ``blocks`` in one namespace; a failure names the file and the block's line."""
    ns = {"__name__": "__docs__"}
    rel = os.path.relpath(path, ROOT)
    for b in blocks:
        # pad with blank lines so a traceback's line numbers are those of the Markdown file
        code = compile("\n" * (b.line - 1) + b.code, path, "exec")
        start = time.perf_counter()
        try:
            exec(code, ns)
        except Exception as err:
            raise AssertionError(
                f"the python block at {rel}:{b.line} failed: {type(err).__name__}: {err} (mark a "
                f"block that is not meant to run with {SKIP} on the line before its fence)"
            ) from err
        took = time.perf_counter() - start
        if took > SECONDS_PER_BLOCK:  # a warning, not a failure: a busy machine is slower
            warnings.warn(f"the python block at {rel}:{b.line} took {took:.0f} s", stacklevel=1)


def doc_pages() -> List[str]:
    folder = os.path.join(ROOT, "docs")
    return sorted(
        os.path.join(folder, f)
        for f in os.listdir(folder)
        if f.endswith(".md") and any(not b.skip for b in python_blocks(os.path.join(folder, f)))
    )


@pytest.fixture
def doc_env(tmp_path, monkeypatch):
    """A scratch working folder (the blocks write lightning_logs/ etc. there), offline hubs, a
    headless matplotlib; the torch thread count is restored after."""
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    threads = torch.get_num_threads()
    yield tmp_path
    torch.set_num_threads(threads)


def test_block_parser_handles_skips_and_nested_fences(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n```python\na = 1\n```\n"
        f"{SKIP}\n```python\nundefined_name\n```\n"
        "````markdown\n```python\nnested = 1\n```\n````\n"
        "```bash\nls\n```\n"
        "```python\nb = a + 1\n```\n"
    )
    blocks = python_blocks(str(page))
    assert [(b.line, b.code, b.skip) for b in blocks] == [
        (3, "a = 1\n", False),
        (7, "undefined_name\n", True),
        (18, "b = a + 1\n", False),
    ]


def test_readme_python_blocks_run(doc_env):
    path = os.path.join(ROOT, "README.md")
    blocks = [b for b in python_blocks(path) if not b.skip]
    assert blocks, "the README has no runnable python block (its quick start should run)"
    run_blocks(path, blocks)


@pytest.mark.parametrize("path", doc_pages(), ids=os.path.basename)
def test_docs_python_blocks_run(doc_env, path):
    run_blocks(path, [b for b in python_blocks(path) if not b.skip])
