"""Both Colab notebooks run top to bottom on CPU in their tiny setting, with a real executor."""

import pathlib

import nbformat
import pytest

from conftest import REPO, subprocess_env, xla_flags

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["colab_tpu.ipynb", "colab_a100.ipynb"])
def test_notebook_runs_in_tiny_setting(name, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient", reason="pip install '.[notebooks]'")
    monkeypatch.setenv("XLA_FLAGS", xla_flags(1))   # the kernel sees one CPU device, as a CPU runtime has
    # The kernel imports this checkout's jaxlm even where no install points at it, so that the
    # install cell never tries to clone REPO_URL (no network in CI: a clone could wait for ever).
    monkeypatch.setenv("PYTHONPATH", subprocess_env()["PYTHONPATH"])
    notebook = nbformat.read(REPO / "notebooks" / name, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), "strip outputs"
    parameters = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(parameters) == 1 and "TINY = False" in parameters[0].source
    parameters[0].source = parameters[0].source.replace("TINY = False", "TINY = True")
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on any failing cell
    printed = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "'step': 30" in printed
    # Executing again (a "reconnect") finds the finished run and says so instead of training anew.
    notebook2 = nbformat.read(REPO / "notebooks" / name, as_version=4)
    notebook2.cells[[i for i, c in enumerate(notebook2.cells) if c is not None and
                     "parameters" in c.metadata.get("tags", [])][0]].source = parameters[0].source
    nbclient.NotebookClient(notebook2, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed2 = "".join(o.get("text", "") for c in notebook2.cells if c.cell_type == "code" for o in c.outputs)
    assert "already trained to step 30" in printed2 and "'step': 30" in printed2


def test_generated_notebooks_are_current():
    """The committed notebooks are what make_notebooks.py writes (edit the script, not the JSON)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_notebooks", REPO / "notebooks" / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, hw in module.HARDWARE.items():
        committed = nbformat.read(REPO / "notebooks" / f"colab_{name}.ipynb", as_version=4)
        assert [c.source for c in committed.cells] == [c.source for c in module.cells(hw)]
