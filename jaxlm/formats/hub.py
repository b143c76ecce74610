"""Checkpoints named by a Hugging Face Hub id, resolved to local files through ``huggingface_hub``'s cache.

Every place that takes a checkpoint (``jaxlm.load``, ``--checkpoint``, ``--init_from``, ``to-orbax``,
``inspect``) passes it through :func:`resolve` first, so all of them accept::

    step_017500.pt, runs/crow/, model_dir/        a local path (returned as it is)
    Org/Repo  (+ filename="step_017500.pt")       a Hub repository, or one file of it
    hf://Org/Repo/step_017500.pt                  the same as one string (hf://Org/Repo@rev/... for a revision)
    hf://Org/Repo                                 the whole repository (its JSON, safetensors, .pt files)

``huggingface_hub`` is an optional dependency, imported only for a Hub id. It downloads into its
cache (``HF_HUB_CACHE`` / ``HF_HOME``, default ``~/.cache/huggingface/hub``) and, with
``HF_HUB_OFFLINE=1`` or without a network, answers from that cache alone.
"""

from __future__ import annotations

import os
import pathlib
import re

from jaxlm.errors import CheckpointError

PREFIX = "hf://"
# What a Hub repo id looks like: owner/name, each of letters, digits, '-', '_', '.'.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Files fetched beside a checkpoint: what reading it and loading a model may look for.
COMPANIONS = ("config.json", "tokenizer.json")
SNAPSHOT_PATTERNS = ["*.json", "*.safetensors", "*.pt", "*.pth", "*.bin", "*.model", "*.txt"]


def is_hub_id(source) -> bool:
    """True for ``hf://...``, and for ``Org/Repo`` when no such local path exists."""
    if isinstance(source, os.PathLike):
        return False
    text = str(source)
    if text.startswith(PREFIX):
        return True
    return bool(_REPO_ID.match(text)) and not pathlib.Path(text).expanduser().exists()


def parse(source: str, filename: str | None = None) -> tuple[str, str | None, str | None]:
    """(repo_id, filename, revision) of ``hf://Org/Repo[@rev][/path]`` or ``Org/Repo``."""
    text = str(source)
    if text.startswith(PREFIX):
        text = text[len(PREFIX):]
    parts = text.strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise CheckpointError(f"{source}: a Hub id is Org/Repo or hf://Org/Repo/FILE")
    name, _, revision = parts[1].partition("@")
    inner = "/".join(parts[2:]) or None
    if inner and filename and inner != filename:
        raise CheckpointError(f"{source}: names the file {inner} and filename= names {filename}; give one")
    return f"{parts[0]}/{name}", inner or filename, revision or None


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError("Hub ids need huggingface_hub: pip install huggingface_hub "
                              "(or download the files and pass their local path)") from None
    return huggingface_hub


def _hub_error(error: Exception, what: str) -> CheckpointError:
    kind = type(error).__name__
    hints = {
        "RepositoryNotFoundError": "no such repository (or it is private: log in with `hf auth login`)",
        "GatedRepoError": "the repository is gated: accept its terms on the Hub and log in",
        "RevisionNotFoundError": "no such revision",
        "EntryNotFoundError": "no such file in the repository",
        "RemoteEntryNotFoundError": "no such file in the repository",
        "LocalEntryNotFoundError": "not in the local Hub cache, and the Hub cannot be reached "
                                   "(offline, or HF_HUB_OFFLINE=1)",
        "OfflineModeIsEnabled": "not in the local Hub cache and HF_HUB_OFFLINE=1",
    }
    detail = hints.get(kind) or f"{kind}: {str(error).strip().splitlines()[0][:160] if str(error).strip() else ''}"
    return CheckpointError(f"{what}: {detail}")


def resolve(source, filename: str | None = None, *, revision: str | None = None) -> pathlib.Path:
    """The local path of ``source``: itself when local, else the Hub file or snapshot in the cache.

    ``filename``: one file of the repository (its config.json and tokenizer.json are fetched beside
    it when the repository has them); without it, the repository's checkpoint files (JSON,
    safetensors, .pt) are fetched and the snapshot directory returned.
    """
    if not is_hub_id(source):
        path = pathlib.Path(source).expanduser()
        return path / filename if filename else path
    repo_id, filename, parsed_revision = parse(str(source), filename)
    revision = revision or parsed_revision
    hub = _hub()
    what = f"{repo_id}{'@' + revision if revision else ''}{'/' + filename if filename else ''} (Hugging Face Hub"
    what += ")" if str(source).startswith(PREFIX) else f"; no local path {source} either)"
    if filename is None:
        try:
            return pathlib.Path(hub.snapshot_download(repo_id, revision=revision, allow_patterns=SNAPSHOT_PATTERNS))
        except Exception as error:  # noqa: BLE001 - huggingface_hub and requests raise many types
            raise _hub_error(error, what) from None
    try:
        path = pathlib.Path(hub.hf_hub_download(repo_id, filename, revision=revision))
    except Exception as error:  # noqa: BLE001
        raise _hub_error(error, what) from None
    companions = list(COMPANIONS)
    if filename.endswith(".index.json"):  # a sharded checkpoint: its shards too
        import json
        companions += sorted(set(json.loads(path.read_text()).get("weight_map", {}).values()))
    folder = str(pathlib.PurePosixPath(filename).parent)
    for name in companions:
        name = name if folder == "." else f"{folder}/{name}"
        if name == filename:
            continue
        try:
            hub.hf_hub_download(repo_id, name, revision=revision)
        except Exception as error:  # noqa: BLE001 - a repository need not have a tokenizer or config
            if name.endswith(".safetensors"):
                raise _hub_error(error, f"{repo_id}/{name} (Hugging Face Hub)") from None
    return path
