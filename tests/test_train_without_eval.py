"""``train.eval_batches = 0``: a run that asks for no held-out loss trains, saves and says so."""

CONFIG = '''
from jaxlm.config import CheckpointConfig, Config, DataConfig, OptimConfig, TrainConfig
from jaxlm.models.toylm import ToyLMConfig
def get_config():
    return Config(
        model=ToyLMConfig(vocab_size=512, dim=32, n_layers=2, n_heads=2, head_dim=16, mlp_hidden=64,
                          max_seq_len=64, sliding_window=16),
        train=TrainConfig(steps=4, batch_size=8, seq_len=32, log_every=2, eval_every=2, eval_batches=0,
                          sample_prompt=""),
        optim=OptimConfig(lr=0.02, warmup_steps=1),
        data=DataConfig(source="pydoc", vocab_size=512, cache_dir=CACHE),
        checkpoint=CheckpointConfig(every_steps=2, async_save=False),
        out_dir=OUT)
'''


def test_no_held_out_batches_trains_and_logs_no_eval(tmp_path, capsys):
    from jaxlm.monitor import read_metrics
    from jaxlm.train import main
    config = tmp_path / "no_eval.py"
    config.write_text(CONFIG.replace("CACHE", repr(str(tmp_path / "cache"))).replace("OUT", repr(str(tmp_path / "run"))))
    assert main(["--config", str(config)]) == 0
    assert "trained to step 4 (train.eval_batches = 0: no held-out loss)" in capsys.readouterr().out
    metrics = read_metrics(tmp_path / "run")
    assert [s for s, _ in metrics["train/loss"]] == [2, 4]
    assert not [name for name in metrics if name.startswith("eval/")]
