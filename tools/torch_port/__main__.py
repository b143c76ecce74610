"""``python -m tools.torch_port``: PyTorch checkpoints in and out of jaxlm.

    to-orbax SRC DST     a .pt / .safetensors / Hugging Face directory (any family, any naming) -> an Orbax export
    to-torch SRC DST.pt  an export, a run directory or a .pt -> a .pt in the card's layout (or .safetensors,
                         or DST/ without a suffix: a Hugging Face directory, --max-shard-size to shard it),
                         with SRC's tokenizer beside it, so that jaxlm.load(DST) and generate find it
    to-bin SRC DST.bin   a checkpoint of a family with a native format for DST's suffix (Llama Think: the
                         llama2.c model.bin v3, lossy) -> that file
    inspect FILE         keys, shapes, dtypes, cfg, each family's claim, what maps to what
    probe SRC --tokenizer tokenizer.json --text FILE   which unpublished convention fits the checkpoint

SRC / FILE may be a Hub id: ``hf://Org/Repo/step_017500.pt``, or ``Org/Repo`` with ``--filename``
(``jaxlm.formats.hub``; needs huggingface_hub). Every failure a user can cause ends in one line
``error: ...`` and exit status 2.
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import sys
import time

from jaxlm.errors import ArgumentParser, CheckpointError, JaxlmError, positive_int


def _tokenizer_files(src, explicit, vocab_size: int) -> list[pathlib.Path]:
    """The tokenizer files that travel with a converted checkpoint: ``explicit`` (read and checked
    against the model's vocabulary, so that a file that is not a tokenizer is refused in one line),
    else the one ``jaxlm.load(src)`` would use; with the ``tokenizer_config.json`` beside it that
    names its EOS. [] when there is none."""
    from jaxlm.api import find_tokenizer
    from jaxlm.data.tokenizer import TOKENIZER_CONFIG
    _, path = find_tokenizer(pathlib.Path(src), explicit, vocab_size)
    if path is None:
        return []
    config = path.with_name(TOKENIZER_CONFIG)
    return [path, config] if config.is_file() else [path]


def _check_folder_for(files: list[pathlib.Path], folder: pathlib.Path, what: pathlib.Path) -> None:
    """Refuse a folder whose tokenizer is another one: ``jaxlm.load(what)`` would pair it with ``what``."""
    from jaxlm.data.tokenizer import SENTENCEPIECE_MODEL, TOKENIZER_CONFIG, TOKENIZER_JSON
    ours = {f.name: f for f in files}
    for name in (TOKENIZER_JSON, SENTENCEPIECE_MODEL, TOKENIZER_CONFIG):
        there = folder / name
        if there.is_file() and (name not in ours or there.read_bytes() != ours[name].read_bytes()):
            raise CheckpointError(f"{there} is not the tokenizer of {what.name}'s source, and jaxlm.load would "
                                  f"pair the two; write {what.name} to a folder of its own (or remove {there})")


def _copy_beside(files: list[pathlib.Path], folder: pathlib.Path) -> None:
    for file in files:
        if not (folder / file.name).exists():  # one that is there is the same (_check_folder_for)
            shutil.copyfile(file, folder / file.name)


def _tokenizer_note(files: list[pathlib.Path], folder: pathlib.Path) -> str:
    if files:
        return f"; {' and '.join(f.name for f in files)} beside it"
    return f"; no tokenizer found with the source: generating from it needs --tokenizer (or one in {folder})"


def _step(conv) -> str:
    return "no step recorded" if conv.step is None else f"step {conv.step}"


def _to_orbax(args) -> None:
    from jaxlm import formats
    src = formats.resolve(args.src, args.filename)
    conv = formats.read_checkpoint(src, key_map=args.key_map, overrides=args.set,
                                   with_optimizer=not args.weights_only, family=args.family)
    tokenizer = _tokenizer_files(src, args.tokenizer, conv.model_cfg.vocab_size)
    dst = formats.save_export(conv, args.dst, overwrite=args.force)
    _copy_beside(tokenizer, dst)
    for note in conv.notes:
        print(f"note: {note}")
    what = "parameters + optimizer state" if conv.has_optimizer else "parameters"
    print(f"wrote {dst} ({what}, {_step(conv)}{_tokenizer_note(tokenizer, dst)}); load with "
          f"jaxlm.load({str(dst)!r}) or train on with --init_from {dst}")


def _to_torch(args) -> None:
    from jaxlm import formats
    from jaxlm.formats.converted import layout_of
    src = formats.resolve(args.src, args.filename)
    conv = formats.read_checkpoint(src, key_map=args.key_map, overrides=args.set,
                                   with_optimizer=not args.weights_only, family=args.family)
    dst = pathlib.Path(args.dst).expanduser()
    file_layout = layout_of(dst, args.layout)
    folder = dst if file_layout == "hf" else dst.parent
    tokenizer = _tokenizer_files(src, args.tokenizer, conv.model_cfg.vocab_size)
    _check_folder_for(tokenizer, folder, dst)
    optim_cfg, lrs = None, None
    if conv.run_config is not None:  # a jaxlm run: its optimizer settings and current learning rates
        from jaxlm.formats.run_dir import run_optim_config
        from jaxlm.optim import build_optimizer
        from jaxlm.formats.converted import nest
        optim_cfg = run_optim_config(conv.run_config)
        steps = conv.run_config.get("train", {}).get("steps", 1)
        _, schedules = build_optimizer(optim_cfg, nest(conv.params), steps)
        lrs = {group: schedule(conv.step or 0) for group, schedule in schedules.items()}
    dtype = None if args.dtype == "keep" else args.dtype
    path = formats.write_checkpoint(conv, dst, naming=args.naming, dtype=dtype, optim_cfg=optim_cfg, lrs=lrs,
                                    layout=args.layout, max_shard_size=args.max_shard_size)
    _copy_beside(tokenizer, folder)
    layout = "the source's layout" if conv.layout and not args.naming else f"{args.naming or 'hf'} naming"
    with_optimizer = conv.has_optimizer and not args.weights_only and file_layout == "torch"  # safetensors: none
    print(f"wrote {path} ({layout}, {_step(conv)}{', with optimizer state' if with_optimizer else ''}"
          f"{_tokenizer_note(tokenizer, folder)})"
          + ("; in PyTorch: tools.torch_port.toylm_torch.ToyLM.from_checkpoint(path)" if conv.family == "toylm" else ""))


def _to_native(args) -> None:
    from jaxlm import formats
    from jaxlm.formats.converted import native_formats
    # With its optimizer state: a source that came from a .pt writes back through that file's whole layout.
    conv = formats.read_checkpoint(args.src, key_map=args.key_map, overrides=args.set, filename=args.filename,
                                   family=args.family)
    dst = pathlib.Path(args.dst).expanduser()
    fmt = next((f for _, suffix, f in native_formats(conv.family) if suffix == dst.suffix), None)
    if fmt is None:
        known = ", ".join(suffix for _, suffix, _ in native_formats(conv.family)) or "none"
        raise CheckpointError(f"{dst}: family {conv.family} has no native format for {dst.suffix or 'no suffix'!r} "
                              f"(its formats: {known}); use to-torch for .pt / .safetensors")
    path = fmt.write_object(formats.to_torch_object(conv), dst)
    print(f"note: {fmt.NOTE}")
    print(f"wrote {path} (family {conv.family}, {_step(conv)})")


def _inspect(args) -> None:
    from tools.torch_port.report import inspect
    from jaxlm.formats import hub
    print(inspect(hub.resolve(args.file, args.filename), key_map=args.key_map, overrides=args.set, family=args.family))


def _probe(args) -> None:
    from tools.torch_port.probe import probe
    from jaxlm.formats import hub
    probe(hub.resolve(args.src, args.filename), args.tokenizer, args.text, key_map=args.key_map, seq_len=args.seq_len, max_tokens=args.max_tokens)


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m tools.torch_port", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(cmd, weights=True):
        cmd.add_argument("--key-map", metavar="FILE",
                         help="JSON {their_name_or_regex: our_path} for keys the converter does not recognise")
        cmd.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                         help="a model config field, e.g. rope_pairing=interleaved (repeatable)")
        cmd.add_argument("--family", help="read the checkpoint as this family's (default: the family that claims it)")
        cmd.add_argument("--filename", help="with a Hub repo id as the source: the file in the repository")
        if weights:
            cmd.add_argument("--weights-only", action="store_true", help="leave the optimizer state out")

    cmd = sub.add_parser("to-orbax", help="a .pt / .safetensors checkpoint -> an Orbax export directory")
    cmd.add_argument("src")
    cmd.add_argument("dst")
    cmd.add_argument("--tokenizer", help="tokenizer.json to keep with it (default: the one beside SRC)")
    cmd.add_argument("--force", action="store_true", help="replace DST if it exists")
    common(cmd)
    cmd.set_defaults(run=_to_orbax)

    cmd = sub.add_parser("to-torch", help="an export / run directory / .pt -> .pt (or .safetensors)")
    cmd.add_argument("src")
    cmd.add_argument("dst")
    cmd.add_argument("--naming", help="write the family's key names of this naming (toylm: hf, meta, nanogpt; "
                                      "default: the source's own, else the family's)")
    cmd.add_argument("--layout", choices=("torch", "safetensors", "hf"),
                     help="default: by DST's suffix (.pt, .safetensors; none: a Hugging Face directory)")
    cmd.add_argument("--max-shard-size", metavar="SIZE", help="Hugging Face layout: shards of at most SIZE (e.g. 2GB)")
    cmd.add_argument("--dtype", choices=("keep", "bfloat16", "float32"), default="keep",
                     help="tensor dtype (default: as in the source .pt, else as stored)")
    cmd.add_argument("--tokenizer", help="tokenizer to write beside DST (default: the one with SRC)")
    common(cmd)
    cmd.set_defaults(run=_to_torch)

    cmd = sub.add_parser("to-bin", help="a checkpoint -> its family's own file format (llama2.c model.bin v3)",
                         description="Write SRC (a .pt, an export, a run directory, a .bin) in the native format of "
                                     "its family for DST's suffix. Llama Think's model.bin v3 is lossy: it has no "
                                     "place for CSA's compressors and blend gate or the residual scales, so the C "
                                     "runner runs CSA layers as full attention and residuals as plain sums. Reading "
                                     "a .bin back gives that model; --set llama2c_lossy=true selects the same "
                                     "computation for a checkpoint read normally.")
    cmd.add_argument("src")
    cmd.add_argument("dst")
    common(cmd, weights=False)
    cmd.set_defaults(run=_to_native)

    cmd = sub.add_parser("inspect", help="what a checkpoint holds and how it would map")
    cmd.add_argument("file")
    common(cmd, weights=False)
    cmd.set_defaults(run=_inspect)

    cmd = sub.add_parser("probe", help="losses under each plausible convention; prints the best")
    cmd.add_argument("src")
    cmd.add_argument("--tokenizer", required=True)
    cmd.add_argument("--text", required=True, help="a UTF-8 text file to score")
    cmd.add_argument("--seq-len", type=positive_int, help="tokens per sequence (default: twice the window)")
    cmd.add_argument("--max-tokens", type=positive_int, default=8192, help="tokens scored per setting")
    common(cmd, weights=False)
    cmd.set_defaults(run=_probe)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    start = time.perf_counter()
    try:
        args.run(args)
    except JaxlmError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a destination that cannot be written, a disk that is full
        print(f"error: {error.filename or ''}: {error.strerror or error}", file=sys.stderr)
        return 2
    if args.command in ("to-orbax", "to-torch", "to-bin"):
        print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
