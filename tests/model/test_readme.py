"""The README's first example runs as written on the embedded model, and does what it says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_editor_example_runs(tmp_path, monkeypatch):
    block = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)[0]
    assert "lmedit.Editor(" in block and "editor.undo()" in block
    monkeypatch.chdir(tmp_path)  # the example writes france.safetensors into the working directory
    ns: dict = {}
    exec(compile(block, "README.md", "exec"), ns)
    model, editor, result = ns["model"], ns["editor"], ns["result"]
    assert float(result.targets.target_prob[0]) > 0.5
    assert (tmp_path / "france.safetensors").is_file()
    # the last line re-applied the saved deltas after undo: the weights are those of the edit again
    adapter = editor.adapter
    for layer, delta in result.deltas.items():
        W0 = result.applied.originals[layer]
        expect = (adapter.as_out_in(W0).double() + delta.double()).float()
        assert torch.equal(adapter.weight(model, layer).detach(), expect)
