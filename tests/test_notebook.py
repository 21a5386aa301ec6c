"""The Colab quickstart: notebooks/quickstart.ipynb runs offline on the embedded tiny model, its HF
branch loads a local checkpoint folder, and the .ipynb is the jupytext rendering of the .py.

The notebook runs in a fresh ipykernel (nbclient) with a clean environment: one CPU device (no
device-count flag from conftest), HF_HUB_OFFLINE=1.
"""

import math
import os
import re
from pathlib import Path

import jupytext
import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from cream_jax.models.hf import save_hf_llama
from cream_jax.models.llama import LlamaConfig
from tests._fast_xla import FAST_XLA
from tests._tiny_models import TINY_LLAMA, random_llama, save_tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
NB_PY = ROOT / "notebooks" / "quickstart.py"
NB_IPYNB = ROOT / "notebooks" / "quickstart.ipynb"


def kernel_env(tmp: Path) -> dict:
    # One device (no device-count flag; the fast-compile ones), the kernel's own inline plots (no MPLBACKEND), and the notebook's
    # temporary run directory inside the test's tmp_path (TMPDIR).
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MPLBACKEND")}
    env.update(XLA_FLAGS=FAST_XLA, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", CREAM_JAX_NO_PROGRESS="1", TMPDIR=str(tmp),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    return env


def execute(nb: nbformat.NotebookNode, cwd: Path) -> nbformat.NotebookNode:
    """Runs every cell (raises nbclient's CellExecutionError on the first failing one)."""
    client = NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(cwd)}})
    client.execute(env=kernel_env(cwd))
    return nb


def with_parameters(nb: nbformat.NotebookNode, source: str) -> nbformat.NotebookNode:
    """Inserts ``source`` right after the cell tagged "parameters" (papermill's convention)."""
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(source))
    return nb


def text_of(nb: nbformat.NotebookNode) -> str:
    """Everything the code cells printed."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                parts.append(out.text)
            elif out.output_type in ("execute_result", "display_data"):
                parts.append(out.data.get("text/plain", ""))
    return "\n".join(parts)


def printed_array(text: str, label: str) -> np.ndarray:
    match = re.search(re.escape(label) + r"\s*\[([^\]]*)\]", text)
    assert match, f"{label!r} not printed"
    return np.array(match.group(1).split(), dtype=np.float64)


@pytest.mark.slow
def test_notebook_runs_offline_on_the_embedded_model(tmp_path):
    nb = execute(nbformat.read(NB_IPYNB, as_version=4), tmp_path)
    text = text_of(nb)
    assert "HF_HUB_OFFLINE=1: using the embedded tiny model" in text
    assert "model: embedded" in text

    c = printed_array(text, "consistency C per prompt:")
    assert c.shape == (32,) and np.all((c >= 0) & (c <= 1)), c
    kept, prompts = map(int, re.search(r"pairs kept: (\d+) of (\d+) prompts", text).groups())
    assert prompts == 32 and 1 <= kept <= 32
    assert printed_array(text, "reward margins of the kept pairs:").shape == (kept,)

    # The first step's policy is its reference: every pair's loss is log 2 whatever C is (METHODS 2.3).
    first, last = map(float, re.search(r"loss (\S+) \(log 2 = \S+\) -> (\S+)", text).groups())
    assert abs(first - math.log(2)) < 1e-4, first
    assert last < first - 0.01, (first, last)
    assert len(re.findall(r"^step \d+: loss", text, flags=re.MULTILINE)) == 8

    plots = [o for cell in nb.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(plots) == 1  # the consistency and margin histograms, one figure


@pytest.mark.slow
def test_notebook_loads_a_local_hf_checkpoint(tmp_path):
    """The HF branch (set-up cells only): MODEL as a local folder goes through load_hf_llama.

    The folder is written by save_hf_llama (no torch import); that transformers' own folders load
    is tested in test_hf.py.
    """
    folder = tmp_path / "tiny-llama"
    config = LlamaConfig.from_hf(TINY_LLAMA)
    save_hf_llama(random_llama(config), config, str(folder))
    save_tiny_tokenizer(folder)
    nb = nbformat.read(NB_IPYNB, as_version=4)
    last_setup = next(i for i, c in enumerate(nb.cells) if "stages.setup(" in c.source)
    nb.cells = nb.cells[: last_setup + 1]
    nb = execute(with_parameters(nb, f"MODEL = {str(folder)!r}"), tmp_path)
    text = text_of(nb)
    assert f"model: {folder} | 2 layers, 64 wide, vocab 128" in text
    assert "using the embedded tiny model" not in text


def test_ipynb_is_the_jupytext_rendering_of_the_py():
    """Edit the .py, then regenerate: ``jupytext --to ipynb notebooks/quickstart.py``."""
    regenerated = jupytext.reads(NB_PY.read_text(), fmt="py:percent")
    committed = nbformat.read(NB_IPYNB, as_version=4)
    assert [(c.cell_type, c.source) for c in committed.cells] == [
        (c.cell_type, c.source) for c in regenerated.cells
    ]
    for cell in committed.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "outputs must be stripped"
