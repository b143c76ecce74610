"""Input-pipeline throughput: host batches per second from each kind of source.

    python -m jaxlm.data.bench                      # seq 4096, batch 16, 5 s per case, in-process
    python -m jaxlm.data.bench --workers 2 --seconds 10

Builds its corpora in a temporary directory (no download): pre-tokenized cases use random
ids; text cases use CPython's documentation (pydoc topics) repeated, with a 8192-token BPE
trained on it. Tokens are counted as training tokens (``batch x seq_len``). With
``--workers 0`` the pipeline runs in this process (one core, plus tokenizer threads for
text); results go into docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time

import numpy as np

from jaxlm.errors import ArgumentParser, non_negative_int, positive_float, positive_int
from jaxlm.config import DataConfig, DataSource
from jaxlm.data import tfds_builder
from jaxlm.data.pipeline import make_batch_iterator
from jaxlm.data.sources import PydocTopics
from jaxlm.data.token_shards import write_token_array_record, write_token_file
from jaxlm.data.tokenizer import save_tokenizer, train_tokenizer


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _text_corpus(folder: str, copies: int) -> list[str]:
    """pydoc topics, each copy made distinct, as JSONL and as one Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    topics = PydocTopics()
    docs = [f"[{c}] {topics[i]}" for c in range(copies) for i in range(len(topics))]
    with open(os.path.join(folder, "text.jsonl"), "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    os.makedirs(os.path.join(folder, "parquet"), exist_ok=True)
    pq.write_table(pa.table({"text": docs}), os.path.join(folder, "parquet", "000_00000.parquet"), row_group_size=256)
    return docs


def _measure(data_cfg, tokenizer, seq_len: int, batch_size: int, seconds: float) -> dict:
    start = time.perf_counter()
    it = make_batch_iterator(data_cfg, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=0)
    next(it)  # start-up (worker processes, first documents) is reported apart
    first = time.perf_counter() - start
    count, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        next(it)
        count += 1
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    it.close()
    tokens = count * batch_size * seq_len
    # CPU seconds of this process, all its threads: a per-core figure when nothing runs in workers.
    per_cpu_second = tokens / cpu if data_cfg.num_workers == 0 else float("nan")
    return {"tokens_per_s": tokens / elapsed, "tokens_per_cpu_s": per_cpu_second, "batches_per_s": count / elapsed,
            "first_batch_s": first}


def run(seq_len: int, batch_size: int, seconds: float, workers: int, tokens: int, folder: str,
        read_threads: int = 4, text_copies: int = 12, vocab_size: int = 8192) -> list[dict]:
    rng = np.random.default_rng(0)
    docs = _text_corpus(folder, copies=text_copies)
    tokenizer = train_tokenizer(docs[: len(docs) // text_copies], vocab_size)
    tok_path = str(save_tokenizer(tokenizer, os.path.join(folder, "tokenizer.json")))
    write_token_file(os.path.join(folder, "tokens.bin"), rng.integers(0, vocab_size, tokens), "uint16")
    lengths = rng.integers(200, 1800, tokens // 1000)  # documents of ~1,000 tokens, like FineWeb-edu
    write_token_array_record(os.path.join(folder, "docs.array_record"),
                             (rng.integers(1, vocab_size, n) for n in lengths))
    tfds_builder.quiet_tfds()  # the table is the output, not TFDS's progress bars
    tfds_spec = tfds_builder.prepare(os.path.join(folder, "text.jsonl"), tok_path, "bench", os.path.join(folder, "tfds"))

    common = dict(num_workers=workers, read_threads=read_threads, heldout_fraction=0.01,
                  tfds_data_dir=os.path.join(folder, "tfds"))
    cases = [
        ("pre-tokenized flat .bin (uint16)", DataSource(os.path.join(folder, "tokens.bin"))),
        ("pre-tokenized ArrayRecord docs + EOS + packing", DataSource(os.path.join(folder, "docs.array_record"))),
        ("TFDS-prepared ArrayRecord docs + EOS + packing", DataSource(tfds_spec)),
        ("JSONL text, tokenized on the fly", DataSource(os.path.join(folder, "text.jsonl"))),
        ("Parquet text, streamed, tokenized on the fly", DataSource(os.path.join(folder, "parquet"))),
    ]
    rows = []
    for name, source in cases:
        data_cfg = DataConfig(source=source, **common)
        rows.append({"case": name, **_measure(data_cfg, tokenizer, seq_len, batch_size, seconds)})
        print(f"  {name}: {rows[-1]['tokens_per_s'] / 1e6:.2f} M tokens/s", flush=True)
    return rows


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m jaxlm.data.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=positive_int, default=4096)
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--seconds", type=positive_float, default=5.0, help="measured time per case")
    parser.add_argument("--workers", type=non_negative_int, default=0, help="Grain worker processes (0: in-process)")
    parser.add_argument("--read-threads", type=positive_int, default=4, help="data.read_threads (document reading/tokenizing)")
    parser.add_argument("--tokens", type=positive_int, default=20_000_000, help="size of the pre-tokenized corpora")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    header = (f"{datetime.date.today()}  {_cpu_name()}, {cores} cores available, python {platform.python_version()}, "
              f"workers {args.workers}, read threads {args.read_threads}, seq_len {args.seq_len}, batch {args.batch_size}")
    print(header, flush=True)
    with tempfile.TemporaryDirectory(prefix="jaxlm-bench-") as folder:
        rows = run(args.seq_len, args.batch_size, args.seconds, args.workers, args.tokens, folder, args.read_threads)
    print()
    print(f"| {'source':<48} | {'M tokens/s':>10} | {'M tokens/CPU-s':>14} | {'batches/s':>9} | {'first batch s':>13} |")
    print(f"|{'-' * 50}|{'-' * 12}|{'-' * 16}|{'-' * 11}|{'-' * 15}|")
    for row in rows:
        print(f"| {row['case']:<48} | {row['tokens_per_s'] / 1e6:>10.2f} | {row['tokens_per_cpu_s'] / 1e6:>14.2f} "
              f"| {row['batches_per_s']:>9.1f} | {row['first_batch_s']:>13.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": header, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
