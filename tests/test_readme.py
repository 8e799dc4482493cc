"""The README's usage snippet runs as written (in a temporary folder) and does what it says."""

from __future__ import annotations

import os
import re
import runpy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_snippet(section: str) -> str:
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = text.index(f"## {section}")
    block = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert block, f"no python block under '## {section}'"
    return block.group(1)


def test_usage_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "usage.py"
    script.write_text(readme_snippet("Usage"))
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "trainable parameters:" in out and "merged, max |Δlogits|:" in out
    assert (tmp_path / "adapter.safetensors").is_file()
    err = float(out.rsplit("merged, max |Δlogits|:", 1)[1].split()[0])
    assert err < 1e-4  # merge is float32 arithmetic on the same ΔW
