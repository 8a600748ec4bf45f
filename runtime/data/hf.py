"""Hugging Face datasets as files: the arrow shards of a `save_to_disk` directory, the data files of a
hub dataset's cached snapshot.

Owns finding those files, in the dataset's own order, without converting anything: the readers
read the shards directly, so a 1 TB dataset is never copied into a second cache. `datasets` and
`huggingface_hub` resolve the layouts (README `configs:`, split patterns); nothing here guesses them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .formats import DataError, shown

HUB_FORMATS = (".parquet", ".arrow", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".json")


def saved_files(folder: Path, split: str | None, hint: str) -> list[Path]:
    """The arrow shards of a ``save_to_disk`` dataset (a DatasetDict's ``split``), in saved order."""
    folder = Path(folder)
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in splits:
            raise DataError(f"{shown(folder)}: a DatasetDict with splits {', '.join(splits)}; "
                            f"{'choose one' if split is None else f'it has no split {split!r}'}: {hint('split')}")
        folder = folder / split
    elif split not in (None, "train"):
        raise DataError(f"{shown(folder)}: a single Dataset (no splits); remove `split: {split}`")
    state = folder / "state.json"
    if not state.is_file():
        raise DataError(f"{shown(folder)}: not a dataset saved with `save_to_disk` (no state.json or dataset_dict.json)")
    files = [folder / f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    if missing := [f.name for f in files if not f.is_file()]:
        raise DataError(f"{shown(folder)}: state.json lists {', '.join(missing)}, which is missing")
    return files


def hub_files(source: dict, hint) -> list[Path]:
    """The data files of split ``split`` of hub dataset ``hub`` at ``revision``, from the local cache.

    A snapshot already in the Hugging Face cache (``HF_HUB_CACHE``) is used as it is, without a
    network call (a branch name resolves to the commit cached for it); a missing one is downloaded,
    or with ``HF_HUB_OFFLINE=1`` is an error saying how to fetch it. Which files
    make the split is decided by `datasets` from the snapshot (README ``configs:`` or the standard
    ``data/<split>-*`` patterns), exactly as `load_dataset` would decide it.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, revision = source["hub"], source.get("revision") or "main"
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    cache = os.environ.get("HF_HUB_CACHE")
    try:  # the cache first: `status` and every rank must not touch the network for a cached snapshot
        folder = snapshot_download(repo, repo_type="dataset", revision=revision, cache_dir=cache, local_files_only=True)
    except LocalEntryNotFoundError:
        if offline:
            raise DataError(_not_cached(repo, revision, cache)) from None
        folder = snapshot_download(repo, repo_type="dataset", revision=revision, cache_dir=cache)

    import datasets

    try:
        builder = datasets.load_dataset_builder(folder, name=source.get("subset"))
    except ValueError as e:  # unknown subset: the message lists the available ones
        raise DataError(f"hub dataset {repo}: {e}; {hint('subset')}") from None
    split = source.get("split") or "train"
    files = (builder.config.data_files or {}).get(split)
    if not files:
        raise DataError(f"hub dataset {repo}: no split {split!r} (splits: "
                        f"{', '.join(builder.config.data_files or {}) or 'none'}); {hint('split')}")
    paths = [Path(f) for f in files]
    if odd := [p.name for p in paths if not p.name.endswith(HUB_FORMATS)]:
        raise DataError(f"hub dataset {repo}: {', '.join(odd[:3])} is stored as {builder.name}; "
                        f"cascadec reads {', '.join(HUB_FORMATS)} data files")
    return paths


def _not_cached(repo: str, revision: str, cache: str | None) -> str:
    return (f"hub dataset {repo} at revision {revision} is not in the local Hugging Face cache"
            f"{f' ({cache})' if cache else ''} and HF_HUB_OFFLINE is set; fetch it where there is network: "
            f"`hf download {repo} --repo-type dataset --revision {revision}`")
