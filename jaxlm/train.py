"""Pretraining: ``python -m jaxlm.train --config crowfeather.py [--config.train.steps=200] [--dry_run]``.

The whole optimizer step (gradient accumulation over micro-batches, clipping, Muon +
AdamW) is one jitted function over a pytree state ``{step, params, opt_state, rng}``
whose buffers are donated. The model's graph is static; only its parameters flow.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from jaxlm import config as C
from jaxlm import hardware, sharding
from jaxlm.errors import ArgumentParser, CheckpointError, JaxlmError
from jaxlm.loss import lm_loss
from jaxlm.models import family, family_of
from jaxlm.models.family import Buffer
from jaxlm.monitor import Monitor
from jaxlm.sampling import SamplingConfig
from jaxlm.state import merge_model, plan_state


# --------------------------------------------------------------------------- summary


def summary(cfg: C.Config) -> str:
    """Parameter count, FLOPs, attention layout and a memory estimate, without allocating weights."""
    m, t = cfg.model, cfg.train
    n_params = m.param_count()
    tokens_per_step = t.batch_size * t.seq_len * t.grad_accum
    # float32 params + grads + two float32 optimizer moments (AdamW; Muon keeps one).
    state_bytes = n_params * 4 * 4
    act_dtype_bytes = 2 if t.compute_dtype == "bfloat16" else 4
    logits_bytes = t.batch_size * (t.loss_chunk or t.seq_len) * m.vocab_size * 4
    lines = [
        f"family            {family_of(m)}",
        f"parameters        {n_params:,}",
        f"FLOPs per token   {m.flops_per_token(t.seq_len) / 1e6:,.1f} M (training, seq {t.seq_len})",
        f"tokens per step   {tokens_per_step:,} ({t.batch_size} x {t.seq_len} x {t.grad_accum} accum)",
        f"compute dtype     {t.compute_dtype} (float32 master weights)",
        f"memory estimate   {state_bytes / 2**20:,.0f} MiB params+grads+optimizer, "
        f"{logits_bytes / 2**20:,.0f} MiB float32 logits per micro-batch "
        f"({act_dtype_bytes}-byte activations not counted)",
    ]
    lines.append("layers            " + " ".join(f"{i}:{k}" for i, k in enumerate(family.layer_descriptions(m))))
    if m.flops_note():
        lines.append("FLOP formula      " + m.flops_note())
    return "\n".join(lines)


# --------------------------------------------------------------------------- state and step


def make_train_step(graphdef, tx, cfg: C.Config):
    """One optimizer step over a ``[grad_accum, B, T+1]`` token batch."""

    t = cfg.train

    head_loss = cfg.model.loss_terms()

    def loss_fn(params, buffers, tokens_BT1):
        model = merge_model(graphdef, params, buffers)
        loss, metrics = lm_loss(model, tokens_BT1, chunk=t.loss_chunk, fused=t.fused_loss, head_loss=head_loss,
                                remat=t.remat, scan_layers=t.scan_layers)
        # The model may update its buffers in the forward pass (outside the gradient).
        new_buffers = None if buffers is None else nnx.state(model, Buffer)
        return loss, (metrics, new_buffers)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, tokens_GBT1):
        params = state["params"]

        def micro_step(carry, tokens_BT1):
            grads_sum, buffers = carry
            (loss, (metrics, buffers)), grads = grad_fn(params, buffers, tokens_BT1)
            return (jax.tree.map(jnp.add, grads_sum, grads), buffers), (loss, metrics)

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads_sum, buffers), (losses, metrics) = jax.lax.scan(micro_step, (zeros, state.get("buffers")),
                                                               tokens_GBT1)
        grads = jax.tree.map(lambda g: g / tokens_GBT1.shape[0], grads_sum)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {**state, "step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                     "opt_state": opt_state}
        if buffers is not None:
            new_state["buffers"] = buffers
        out = {"loss": jnp.mean(losses), "grad_norm": optax.global_norm(grads),
               **{k: jnp.mean(v, axis=0) for k, v in metrics.items()}}
        return new_state, out

    return train_step


def jit_train_step(plan, cfg: C.Config):
    """The jitted step as training runs it (and ``jaxlm.bench`` times it): the state's buffers
    are donated, so the new state reuses the old one's memory."""
    return jax.jit(make_train_step(plan.graphdef, plan.tx, cfg), donate_argnums=0,
                   out_shardings=(plan.shardings, None))


def make_eval_step(graphdef):
    def eval_step(params, buffers, tokens_BT1):
        loss, metrics = lm_loss(merge_model(graphdef, params, buffers), tokens_BT1)
        return metrics["ce"]
    return eval_step


# --------------------------------------------------------------------------- the run


def train(cfg: C.Config, *, init_from: str | None = None) -> dict:
    """Train ``cfg``; returns a dict with the final step, losses and output paths."""
    from jaxlm import checkpoint  # Orbax and grain: jaxlm.bench builds the step without them

    t = cfg.train
    mesh = sharding.make_mesh(cfg.mesh)
    is_main = jax.process_index() == 0
    ckpt = checkpoint.Checkpointer(cfg)
    try:
        ckpt.check_config(record=False)
        return _train(cfg, ckpt, mesh, is_main, init_from)
    finally:
        ckpt.close()  # also on an error: no Orbax thread outlives the run


def _train(cfg: C.Config, ckpt, mesh, is_main: bool, init_from: str | None) -> dict:
    from jaxlm import data  # the data stack (grain, tokenizers) is only needed to train

    t = cfg.train
    say = print if is_main else (lambda text: None)

    tokenizer = data.load_tokenizer_for(cfg.data, vocab_size=cfg.model.vocab_size)
    batch_rows = t.batch_size * t.grad_accum
    iterator_args = dict(seq_len=t.seq_len, batch_size=batch_rows, seed=cfg.seed,
                         process_index=jax.process_index(), process_count=jax.process_count())
    train_iter = data.make_batch_iterator(cfg.data, tokenizer, split="train", **iterator_args)

    plan = plan_state(cfg, mesh)
    graphdef, learning_rates = plan.graphdef, plan.learning_rates

    with sharding.use_mesh(mesh):
        start_step, state, data_restored = ckpt.restore_latest(plan.abstract, train_iter, log=say)
        if state is not None and start_step >= t.steps:
            # A finished run re-run: its newest checkpoint restored (a damaged one would have fallen
            # back to an older step and trained on), so nothing is left to do and nothing is written.
            say(f"{ckpt.out_dir} is already trained to step {start_step} of {t.steps}: nothing to do "
                "(--config.resume=false trains it again, keeping this run aside)")
            return {"step": start_step, "out_dir": str(ckpt.out_dir), "preempted": False, "done": True,
                    "loss_png": None}
        # From here on the run writes into its directory.
        ckpt.record_config()
        if is_main:  # kept with the run, so that jaxlm.load and the export find it
            tokenizer.save(str(ckpt.out_dir / "tokenizer.json"))
        monitor = Monitor(ckpt.out_dir, t.steps, enabled=is_main)
        if state is not None:
            say(f"resumed from {ckpt.directory / str(start_step)}")
            if not data_restored:
                # Saved by another number of processes: each process's stream is different
                # now, so the best continuation is to skip as many batches as were consumed.
                say(f"the data position was saved for another process count; skipping "
                    f"{start_step} batches of the new pipeline to continue past them")
                for _ in range(start_step):
                    next(train_iter)
        else:
            start_step = 0
            state = plan.init(cfg)
            if init_from:  # a converted or foreign checkpoint: params, optimizer moments and step
                from jaxlm.formats import init_train_state
                state = init_train_state(init_from, cfg, state, out_dir=ckpt.out_dir, log=monitor.print)
                start_step = int(state["step"])
        monitor.advance(start_step)

        step_fn = jit_train_step(plan, cfg)
        eval_fn = jax.jit(make_eval_step(graphdef))
        flops_per_step = cfg.model.flops_per_token(t.seq_len) * t.batch_size * t.seq_len * t.grad_accum
        peak = hardware.peak_flops_per_device()

        stop = _install_signal_handlers()
        step = start_step
        window_start, window_steps = time.perf_counter(), 0
        while step < t.steps and not stop["now"]:
            host_batch = next(train_iter)
            tokens = sharding.global_batch(
                host_batch.reshape(t.grad_accum, -1, host_batch.shape[-1]), mesh, batch_axis=1)
            state, metrics = step_fn(state, tokens)
            step += 1
            window_steps += 1
            if step % t.log_every == 0 or step == t.steps:
                metrics = scalar_metrics(jax.device_get(metrics))
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_steps * t.batch_size * t.seq_len * t.grad_accum / elapsed
                metrics["tokens_per_s"] = tokens_per_s
                if peak:
                    metrics["mfu"] = flops_per_step * window_steps / elapsed / (peak * jax.device_count())
                for group, schedule in learning_rates.items():
                    metrics[f"lr_{group}"] = float(schedule(step - 1))
                if not all(math.isfinite(float(v)) for v in metrics.values()):
                    raise JaxlmError(f"training diverged at step {step} (loss {metrics['loss']}); "
                                     "lower optim.lr or raise optim.warmup_steps")
                monitor.log(step, metrics)
                window_start, window_steps = time.perf_counter(), 0
            monitor.advance(step)
            if t.eval_every and t.eval_batches and step % t.eval_every == 0 and step < t.steps:
                monitor.log(step, {"loss": evaluate(cfg, eval_fn, state, tokenizer, mesh)}, prefix="eval")
            if ckpt.should_save(step):
                ckpt.save(step, state, train_iter)

        ckpt.save(step, state, train_iter)  # the final step, or the step at which a signal arrived
        ckpt.wait()
        result = {"step": step, "out_dir": str(ckpt.out_dir), "preempted": stop["now"], "signal": stop["signal"]}
        if not stop["now"] and t.eval_batches:
            result["eval_loss"] = evaluate(cfg, eval_fn, state, tokenizer, mesh)
            result["unigram_loss"] = unigram_baseline(cfg, tokenizer)
            monitor.log(step, {"loss": result["eval_loss"], "unigram_baseline": result["unigram_loss"]},
                        prefix="eval")
        if not stop["now"]:
            if t.sample_prompt:
                weights = {k: state[k] for k in ("params", "buffers") if k in state}
                weights = (multihost_utils.process_allgather(weights, tiled=True)
                           if jax.process_count() > 1 else jax.device_get(weights))
            if t.sample_prompt and is_main:
                model = merge_model(graphdef, weights["params"], weights.get("buffers"))
                result["sample"] = sample_text(model, tokenizer, t.sample_prompt, t.sample_tokens, cfg.seed,
                                               eos_token=cfg.data.eos_token)
                monitor.print(f"sample: {t.sample_prompt}{result['sample']}")
        else:
            monitor.print(f"stopped by signal at step {step}; checkpoint saved, re-run the same command to resume")
    png = monitor.close()
    result["loss_png"] = str(png) if png else None
    return result


def scalar_metrics(metrics: dict) -> dict:
    """Each metric as floats for the log: a vector (per-expert load) becomes ``name/i`` entries."""
    out = {}
    for name, value in metrics.items():
        value = np.asarray(value)
        if value.ndim == 0:
            out[name] = float(value)
        else:
            out.update({f"{name}/{i}": float(v) for i, v in enumerate(value.ravel())})
    return out


def _install_signal_handlers() -> dict:
    """SIGTERM / SIGINT (preemption notices) ask the loop to stop after the current step."""
    stop = {"now": False, "signal": None}

    def handler(signum, frame):
        if stop["now"]:           # a second Ctrl-C: leave at once
            raise KeyboardInterrupt
        stop["now"], stop["signal"] = True, signum

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    return stop


def evaluate(cfg: C.Config, eval_fn, state, tokenizer, mesh) -> float:
    """Mean cross-entropy over ``train.eval_batches`` held-out batches."""
    from jaxlm import data
    t = cfg.train
    heldout = data.make_batch_iterator(cfg.data, tokenizer, split="heldout", seq_len=t.seq_len,
                                       batch_size=t.batch_size, seed=cfg.seed,
                                       process_index=jax.process_index(), process_count=jax.process_count())
    losses = []
    for _, batch in zip(range(t.eval_batches), heldout):
        losses.append(float(eval_fn(state["params"], state.get("buffers"), sharding.global_batch(batch, mesh))))
    return float(np.mean(losses)) if losses else float("nan")


def unigram_baseline(cfg: C.Config, tokenizer, train_batches: int = 50) -> float:
    """Cross-entropy of held-out tokens under the unigram distribution of the first training
    batches (add-one smoothed): what a model that ignores context would reach."""
    from jaxlm import data

    def tokens(split, n):
        batches = data.make_batch_iterator(cfg.data, tokenizer, split=split, seq_len=cfg.train.seq_len,
                                           batch_size=cfg.train.batch_size, seed=cfg.seed)
        return np.concatenate([b[:, 1:].ravel() for _, b in zip(range(n), batches)])

    counts = np.bincount(tokens("train", train_batches), minlength=cfg.model.vocab_size)
    probs = (counts + 1) / (counts.sum() + len(counts))
    return float(-np.mean(np.log(probs[tokens("heldout", cfg.train.eval_batches)])))


def sample_text(model, tokenizer, prompt: str, max_new_tokens: int, seed: int, eos_token: str = "") -> str:
    from jaxlm.generate import generate
    eos = tokenizer.token_to_id(eos_token) if eos_token else None
    ids = generate(model, tokenizer.encode(prompt).ids, max_new_tokens=max_new_tokens, seed=seed, eos_id=eos,
                   sampling=SamplingConfig(temperature=0.8, top_p=0.9, repetition_penalty=1.3))
    return tokenizer.decode(ids)


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    from jaxlm import tpu   # light: the names of TPU slices (JAX and libtpu load only to compile)

    parser = ArgumentParser(
        prog="python -m jaxlm.train",
        description="Train a model. Override any config field with --config.SECTION.FIELD=VALUE.")
    parser.add_argument("--config", required=True, help="config name in configs/ (e.g. crowfeather.py) or a path")
    parser.add_argument("--dry_run", action="store_true", help="print the model summary and exit")
    parser.add_argument("--init_from", help="initialise from a checkpoint (.pt, .safetensors or Orbax directory)")
    parser.add_argument("--compile_for", metavar="TPU_SLICE",
                        help="with --dry_run: compile the training step for this TPU slice on this host (no TPU "
                             "needed, the [tpu] extra is), print its memory per chip and FLOPs, and say whether it "
                             f"fits (exit status 0) or not (exit status {tpu.EXIT_DOES_NOT_FIT}). "
                             f"Slices: {tpu.known_names()}")
    return C.parse_args_with_overrides(parser, argv)


def check_schedules(cfg: C.Config) -> None:
    """The learning-rate schedules of ``cfg`` can be built (warmup against decay against steps):
    a check between fields that ``--dry_run`` must catch, owned by the schedules themselves."""
    from jaxlm.optim.schedules import schedule_from_config
    schedule_from_config(cfg.optim, cfg.optim.lr, cfg.train.steps)


def preflight_init_from(path: str) -> None:
    """A missing, empty or damaged ``--init_from`` file is refused before the data is set up."""
    import pathlib
    from jaxlm import formats
    source = formats.resolve(path, None)
    if not source.exists():
        raise CheckpointError(f"--init_from {path}: no such file or directory")
    if source.is_file():
        formats.read_checkpoint(source, with_optimizer=False)  # raises CheckpointError with the reason
    elif not any(pathlib.Path(source).iterdir()):
        raise CheckpointError(f"--init_from {path}: an empty directory, not a checkpoint")


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        from jaxlm import tpu
        if args.compile_for:
            tpu.prepare_host()   # before anything starts a JAX backend
            topology = tpu.resolve(args.compile_for)
        cfg = C.load_config(args.config, overrides)
        check_schedules(cfg)
        print(summary(cfg))
        if args.compile_for:   # a dry run for a TPU slice: nothing is trained
            report = tpu.compile_report(cfg, topology, jit_train_step)
            print(tpu.format_report(report))
            return 0 if report.fits else tpu.EXIT_DOES_NOT_FIT
        if args.dry_run:
            return 0
        if args.init_from:
            preflight_init_from(args.init_from)
        sharding.initialize_distributed()
        result = train(cfg, init_from=args.init_from)
    except JaxlmError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: the checkpoint of the first may not be written
        print("error: interrupted twice; the newest finished checkpoint is kept, re-run to resume", file=sys.stderr)
        return 130
    if "eval_loss" in result:
        print(f"held-out loss {result['eval_loss']:.4f} (unigram baseline {result['unigram_loss']:.4f}); "
              f"checkpoints in {result['out_dir']}/checkpoints; loss curve {result['loss_png']}")
    elif not result.get("done") and not result.get("preempted"):
        print(f"trained to step {result['step']} (train.eval_batches = 0: no held-out loss); "
              f"checkpoints in {result['out_dir']}/checkpoints; loss curve {result['loss_png']}")
    if result.get("preempted") and result.get("signal") == signal.SIGINT:
        # Ctrl-C: the shell's convention (128 + SIGINT), so that a script running several commands
        # stops too. SIGTERM is a preemption notice that was handled (the step is saved and the
        # same command resumes it): a clean exit 0, which schedulers do not count as a failure.
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
