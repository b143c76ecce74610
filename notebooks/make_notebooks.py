"""Writes colab_tpu.ipynb and colab_a100.ipynb from one list of cells (outputs stripped).

The two notebooks differ only in the hardware they set up, so both are generated here
rather than kept in sync by hand: ``python notebooks/make_notebooks.py``.
"""

import pathlib

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HARDWARE = {
    "tpu": {
        "title": "Colab TPU (v2-8, v5e-1, v5e-8, v6e-1)",
        "what": "train a family's TPU preset",
        "runtime": "Runtime → Change runtime type → TPU",
        "jax_extra": "jax[tpu]",
        "run": ('FAMILY = "toylm"   # toylm: Crowfeather-50m, hybrid: Llama Think 95M, deepseek_v4: nanowhale-100m\n'
                'RUN_NAME = FAMILY\n'),
        # The family's preset (configs/*_tpu.py, written for 8 TPU devices), carried to the slice found.
        "config": (
            'from jaxlm import tpu\n'
            'found = jax.devices()\n'
            'CONFIG = tpu.presets()[FAMILY]\n'
            'overrides = ["mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=1"]  # FSDP over all TPU cores\n'
            'if found[0].platform == "tpu" and not TINY:   # the sequences per device that fit, the tokens per step\n'
            '    overrides += tpu.slice_overrides(CONFIG, len(found), found[0].device_kind)\n'
            'print(f"found {len(found)} x {found[0].device_kind}:", CONFIG, " ".join(overrides[3:]) or "as written")\n'),
    },
    "a100": {
        "title": "Colab A100",
        "what": "continue Crowfeather-50m",
        "runtime": "Runtime → Change runtime type → A100 GPU",
        "jax_extra": "jax[cuda12]",
        "run": 'RUN_NAME = "crowfeather"\n',
        "config": ('CONFIG = "crowfeather_1gpu.py"\n'
                   'overrides = ["mesh.data=-1", "mesh.fsdp=1", "mesh.tensor=1"]  # one GPU\n'),
    },
}


def cells(hw: dict) -> list:
    return [
        new_markdown_cell(
            f"# jaxlm on {hw['title']}: {hw['what']}, survive disconnects\n\n"
            f"Set the runtime first ({hw['runtime']}). Every cell can be re-run after a disconnect: "
            "checkpoints live on Google Drive and training resumes from the newest one."),
        new_markdown_cell("**Parameters.** `TINY = True` trains a tiny model on CPython's documentation in about a "
                          "minute (what CI runs); `False` is the real run."),
        new_code_cell(
            'TINY = False\n'
            'REPO_URL = "https://github.com/jaxlm/jaxlm"   # where to install jaxlm from, if it is not installed\n'
            + hw["run"] +
            '# A released PyTorch checkpoint to continue from (e.g. the card\'s step_017500.pt); "" starts fresh.\n'
            'CHECKPOINT_URL = ""\n'
            'TOKENIZER_URL = ""\n'
            'PROMPT = "The capital of France is"',
            metadata={"tags": ["parameters"]}),
        new_markdown_cell("**Install.** On Colab this clones jaxlm and installs it with the accelerator's JAX; "
                          "where jaxlm is already installed (CI, a local machine) nothing happens."),
        new_code_cell(
            'import importlib.util, os, subprocess, sys\n'
            'IN_COLAB = "google.colab" in sys.modules\n'
            'if importlib.util.find_spec("jaxlm") is None:\n'
            '    subprocess.run(["git", "clone", "--depth=1", REPO_URL, "/content/jaxlm"], check=True)\n'
            f'    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-U", "{hw["jax_extra"]}", '
            '"-e", "/content/jaxlm[torch]"], check=True)\n'
            '    sys.path.insert(0, "/content/jaxlm")\n'
            'import jax\n'
            'print(jax.devices())'),
        new_markdown_cell("**Persistent directory.** Google Drive on Colab (it outlives the VM), a local folder "
                          "elsewhere. The run directory holds checkpoints, the config, the tokenizer and the logs."),
        new_code_cell(
            'if IN_COLAB:\n'
            '    from google.colab import drive\n'
            '    drive.mount("/content/drive")\n'
            '    WORK = "/content/drive/MyDrive/jaxlm"\n'
            'else:\n'
            '    WORK = os.path.abspath("jaxlm_work")\n'
            'OUT_DIR = os.path.join(WORK, RUN_NAME + ("_tiny" if TINY else ""))\n'
            'os.makedirs(WORK, exist_ok=True)\n'
            'print("run directory:", OUT_DIR)'),
        new_markdown_cell("**Optional: bring a released PyTorch checkpoint in.** The `.pt` is fetched once onto "
                          "Drive and converted to Orbax with `tools.torch_port` (safe loading: no pickled code "
                          "runs); training then starts from it, optimizer state and step included."),
        new_code_cell(
            'import urllib.request\n'
            'INIT_FROM = None\n'
            'if CHECKPOINT_URL and not TINY:\n'
            '    pt = os.path.join(WORK, os.path.basename(CHECKPOINT_URL))\n'
            '    if not os.path.exists(pt):\n'
            '        urllib.request.urlretrieve(CHECKPOINT_URL, pt)\n'
            '    if TOKENIZER_URL and not os.path.exists(os.path.join(WORK, "tokenizer.json")):\n'
            '        urllib.request.urlretrieve(TOKENIZER_URL, os.path.join(WORK, "tokenizer.json"))\n'
            '    converted = pt[:-3] + "_orbax"\n'
            '    if not os.path.exists(converted):\n'
            '        subprocess.run([sys.executable, "-m", "tools.torch_port", "to-orbax", pt, converted], check=True)\n'
            '    INIT_FROM = converted\n'
            'print("initialise from:", INIT_FROM or "random weights")'),
        new_markdown_cell("**Config and mesh.** The config file gives the model and recipe; the mesh matches "
                          "this hardware. In the tiny setting the quickstart model replaces it."),
        new_code_cell(
            'from jaxlm.config import load_config\n'
            + hw["config"] +
            'overrides += [f"out_dir={OUT_DIR}", f"data.cache_dir={WORK}/cache"]\n'
            'if TINY:\n'
            '    CONFIG = "quickstart.py"\n'
            '    overrides += ["train.steps=30", "train.log_every=10", "optim.warmup_steps=5",\n'
            '                  "checkpoint.every_steps=10", "train.sample_prompt="]\n'
            'if os.path.exists(os.path.join(WORK, "tokenizer.json")) and not TINY:\n'
            '    overrides.append(f"data.tokenizer={WORK}/tokenizer.json")\n'
            'cfg = load_config(CONFIG, overrides)\n'
            'print(cfg.model)'),
        new_markdown_cell("**Train.** Re-running this cell after a disconnect resumes from the newest checkpoint "
                          "on Drive (the data position included); a finished run just reports its result."),
        new_code_cell(
            'from jaxlm.train import train\n'
            'result = train(cfg, init_from=INIT_FROM)\n'
            'print({k: v for k, v in result.items() if k != "sample"})'),
        new_markdown_cell("**Loss curve** (train and held-out)."),
        new_code_cell(
            'from IPython.display import Image, display\n'
            '# A finished run re-run draws no new curve: the one it drew is in the run directory.\n'
            'display(Image(result["loss_png"] or os.path.join(OUT_DIR, "loss.png")))'),
        new_markdown_cell("**Sample** with the cards' settings (temperature 0.8, top-p 0.9, repetition penalty 1.3)."),
        new_code_cell(
            'out = subprocess.run([sys.executable, "-m", "jaxlm.generate", "--checkpoint", OUT_DIR, "--prompt", PROMPT,\n'
            '                      "--max_new_tokens", "40" if TINY else "80", "--temperature", "0.8",\n'
            '                      "--top_p", "0.9", "--repetition_penalty", "1.3", "--seed", "0"],\n'
            '                     capture_output=True, text=True)\n'
            'print(out.stdout)\n'
            'assert out.returncode == 0, out.stderr'),
    ]


def main() -> None:
    here = pathlib.Path(__file__).parent
    for name, hw in HARDWARE.items():
        notebook = new_notebook(cells=cells(hw), metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "accelerator": "TPU" if name == "tpu" else "GPU",
        })
        for number, cell in enumerate(notebook.cells):   # stable ids: a rewrite changes only what changed
            cell.id = f"cell-{number:02d}"
        nbformat.write(notebook, here / f"colab_{name}.ipynb")


if __name__ == "__main__":
    main()
