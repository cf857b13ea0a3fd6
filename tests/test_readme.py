"""The README's Python API snippet runs as written (in a temporary folder, so it writes nothing here)."""
from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_snippet() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Python API"):]
    match = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert match, "the README's Python API section has no ```python block"
    return match.group(1)


def test_readme_python_snippet_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(_python_snippet(), str(README), "exec"), namespace)  # noqa: S102 - the project's own README
    model, small, result = namespace["model"], namespace["small"], namespace["result"]
    assert (tmp_path / "r18-half.pt").is_file()
    dense = sum(p.numel() for p in model.parameters())
    compressed = sum(p.numel() for p in small.parameters())
    assert abs(compressed / dense / 0.5 - 1) <= 0.02  # the snippet's budget, met on the reloaded model
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(small(x), result.model(x), atol=1e-5)  # the file is the decomposed model
