"""Config files, overrides and the one-line errors a user sees for bad values."""

import json
import subprocess
import sys

import pytest

from conftest import REPO
from jaxlm import config as C
from jaxlm.errors import ConfigError
from jaxlm.models import config_from_dict


def run_train(*args):
    return subprocess.run([sys.executable, "-m", "jaxlm.train", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def test_dry_run_prints_summary_without_weights():
    out = run_train("--config", "crowfeather.py", "--dry_run")
    assert out.returncode == 0, out.stderr
    assert "54,538,752" in out.stdout
    assert "435.7 M" in out.stdout
    assert "0:sliding(1024) 1:global" in out.stdout and "11:global" in out.stdout


@pytest.mark.parametrize("override, fragment", [
    ("--config.train.stepz=3", "unknown config key 'train.stepz'"),
    ("--config.train.steps=abc", "train.steps = 'abc': expected int"),
    ("--config.model.n_heads=7", "model.n_heads * model.head_dim = 7 * 64 = 448: must equal model.dim (512)"),
    ("--config.model.sliding_window=9000", "model.sliding_window = 9000: must be <= model.max_seq_len"),
    ("--config.optim.schedule=linear", "optim.schedule = 'linear': allowed: 'wsd', 'cosine', 'constant'"),
    ("--config.train.seq_len=10000", "train.seq_len = 10000: must be <= model.max_seq_len (8192)"),
])
def test_bad_values_give_one_line_and_no_traceback(override, fragment):
    out = run_train("--config", "crowfeather.py", "--dry_run", override)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert fragment in out.stderr


def test_missing_config_names_the_known_ones():
    out = run_train("--config", "nope.py", "--dry_run")
    assert out.returncode == 2 and "quickstart.py" in out.stderr and "Traceback" not in out.stderr


def test_config_found_by_name_and_by_path_and_overridden(tmp_path):
    by_name = C.load_config("quickstart", ["train.steps=7", "optim.lr=1", "data.tokenizer=tok.json"])
    assert by_name.train.steps == 7 and by_name.optim.lr == 1.0 and isinstance(by_name.optim.lr, float)
    assert by_name.data.tokenizer == "tok.json"
    by_path = C.load_config(str(REPO / "configs" / "shard.py"))  # builds on crowfeather.py
    assert by_path.model.param_count() == 54_538_752 and by_path.out_dir == "runs/shard"


def test_wrong_type_inside_a_config_file(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("from jaxlm.config import Config\nfrom jaxlm.models.toylm import ToyLMConfig\n"
                    "def get_config():\n    return Config(model=ToyLMConfig(dim='512'))\n")
    with pytest.raises(ConfigError, match=r"model.dim = '512': expected int, got str"):
        C.load_config(str(path))


def test_json_round_trip_and_unknown_keys():
    cfg = C.load_config("crowfeather.py")
    data = json.loads(C.to_json(cfg))
    assert data["model"]["family"] == "toylm"
    assert config_from_dict(data) == cfg
    data["train"]["warp_speed"] = 9
    with pytest.raises(ConfigError, match="warp_speed"):
        config_from_dict(data)
