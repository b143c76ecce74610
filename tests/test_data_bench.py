"""The input-pipeline benchmark runs end to end (numbers go to docs/PERFORMANCE.md)."""


def test_benchmark_runs_every_case(tmp_path):
    from jaxlm.data import bench

    rows = bench.run(seq_len=63, batch_size=2, seconds=0.2, workers=0, tokens=20_000, folder=str(tmp_path),
                     text_copies=1, vocab_size=600)
    assert len(rows) == 5 and all(row["tokens_per_s"] > 0 and row["batches_per_s"] > 0 for row in rows)
