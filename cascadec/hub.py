"""Models named by a Hugging Face hub id: which commit a revision means now, and its local snapshot.

Torch-free (`status` uses it); `huggingface_hub` is imported only when a plan names a hub model.
The executor is the one resolver of the runtime: it hands every stage a snapshot folder, never a
hub id, so calibrate, prune, distill, eval, export, teacher-logits and tokenizer fingerprints all
read real files.

Decisions (written for users in docs/runtime.md, "Hub models"):

- Files: `config.json`, `generation_config.json`, the transformers safetensors weights
  (`model.safetensors`, or `model-*-of-*.safetensors` with `model.safetensors.index.json`) and
  the tokenizer files. Nothing else: Mistral repositories also carry `consolidated.safetensors`,
  a second copy of the weights in Mistral's own format. `snapshot_download` resumes a killed
  download and never fetches a cached file twice.
- A revision of 40 hex digits is a pinned commit: nothing to resolve.
- A branch or tag (default `main`): `cascadec run` asks the hub which commit it names now (one
  small API call, `HfApi.resolve_revision`, which also writes the cache's `refs/<revision>`);
  with `HF_HUB_OFFLINE=1`, or when the hub cannot be reached, it reads `refs/<revision>` from
  the local cache. `cascadec status` never goes online: it reads `refs/<revision>`, i.e. the
  commit the last run or download on this machine resolved. A revision that cannot be resolved
  now is *not checked* (a stage that must run then fails with the download error, naming the
  model); a revision the hub says does not exist is an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja")
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")
FILES = ("config.json", "generation_config.json", *WEIGHTS, *TOKENIZER_FILES, "added_tokens.json")
COMMIT = re.compile(r"[0-9a-f]{40}")
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[^\s@]+)?")  # ORG/NAME[@REVISION]
DEFAULT_REVISION = "main"


class HubError(Exception):
    """A hub model that cannot be resolved or downloaded, as one line for the user.

    ``unreachable``: the hub could not be asked (offline, network) and the cache cannot answer;
    `status` and the up-to-date check then leave the revision unchecked."""

    def __init__(self, message: str, *, unreachable: bool = False, short: str = ""):
        super().__init__(message)
        self.unreachable, self.short = unreachable, short or message


@dataclass(frozen=True)
class HubModel:
    """A plan model whose source is a hub id."""

    name: str  # the plan's model name
    repo: str  # org/name
    revision: str  # as the spec gives it; `main` when it gives none

    @property
    def label(self) -> str:
        return f"model {self.name!r} ({self.repo}@{self.revision})"

    @property
    def pinned(self) -> bool:
        return bool(COMMIT.fullmatch(self.revision))


def hub_model(plan: dict, name: str) -> HubModel | None:
    """The plan's model ``name`` when its source is a hub id, else None."""
    source = ((plan.get("models") or {}).get(name) or {}).get("source")
    if not isinstance(source, dict) or "hub" not in source:
        return None
    return HubModel(name, source["hub"], source.get("revision") or DEFAULT_REVISION)


def hub_models(plan: dict, stage: dict) -> list[HubModel]:
    """The hub models a stage reads (its `model` inputs), sorted by name."""
    names = sorted({inp["model"] for inp in stage.get("inputs", []) if "model" in inp})
    return [m for m in (hub_model(plan, n) for n in names) if m is not None]


def _cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def _fetch_hint(m: HubModel) -> str:
    return (f"run it once where the hub is reachable (HF_HUB_OFFLINE unset), or fetch it with "
            f"`hf download {m.repo} --revision {m.revision}`")


def resolve(m: HubModel, *, local_only: bool) -> str:
    """The commit ``m.revision`` names now (see the module docstring); HubError if unknown."""
    if m.pinned:
        return m.revision
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, RepositoryNotFoundError,
                                            RevisionNotFoundError, RevisionResolutionError)
    except ImportError:
        raise HubError(f"{m.label}: huggingface_hub is not installed (pip install 'cascadec[runtime]')",
                       unreachable=True, short="huggingface_hub is not installed") from None
    try:
        offline = local_only or _offline()  # HF_HUB_OFFLINE: read the refs without a "cannot reach" warning
        return HfApi().resolve_revision(m.repo, revision=m.revision, local_files_only=offline).resolved
    except RevisionResolutionError:
        if _offline():
            why = f"not in the local Hugging Face cache ({_cache()}) and HF_HUB_OFFLINE=1 forbids asking the hub"
        elif local_only:
            why = f"not in the local Hugging Face cache ({_cache()})"
        else:
            why = f"not in the local Hugging Face cache ({_cache()}) and the hub cannot be reached"
        raise HubError(f"{m.label}: revision {m.revision!r} is {why}; {_fetch_hint(m)}", unreachable=True,
                       short="not in the local Hugging Face cache") from None
    except RevisionNotFoundError:
        raise HubError(f"{m.label}: the hub has no revision {m.revision!r} of {m.repo}; "
                       f"set `revision` in the spec to a branch, tag or commit of {m.repo}") from None
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise HubError(_access(m, e)) from None
    except HfHubHTTPError as e:
        raise HubError(f"{m.label}: the hub refused to resolve revision {m.revision!r}: {_first_line(e)}") from None


def snapshot(m: HubModel, commit: str) -> Path:
    """The local snapshot folder of ``m`` at ``commit``, downloaded (only FILES) when not cached.

    With HF_HUB_OFFLINE=1 it is the cached folder or a HubError: the same `snapshot_download`
    call either way, so an offline run takes exactly the path of an online one."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (GatedRepoError, IncompleteSnapshotError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise HubError(f"{m.label}: huggingface_hub is not installed (pip install 'cascadec[runtime]')") from None
    at = f"{m.repo} at {commit[:12]} (revision {m.revision})"
    try:
        folder = Path(snapshot_download(m.repo, revision=commit, allow_patterns=list(FILES)))
    except IncompleteSnapshotError as e:
        raise HubError(f"{m.label}: the cached snapshot of {at} is incomplete ({_first_line(e)}); "
                       f"{_fetch_hint(m)}", unreachable=True) from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE=1 forbids downloading it" if _offline() else "the hub cannot be reached"
        raise HubError(f"{m.label}: {at} is not in the local Hugging Face cache ({_cache()}) and {why}; "
                       f"{_fetch_hint(m)}", unreachable=True) from None
    except RevisionNotFoundError:
        raise HubError(f"{m.label}: the hub has no commit {commit} of {m.repo}; "
                       f"set `revision` in the spec to a branch, tag or commit of {m.repo}") from None
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise HubError(_access(m, e)) from None
    except Exception as e:  # noqa: BLE001 -- network, disk, Xet: whatever stops a download is one line
        raise HubError(f"{m.label}: downloading {at} failed ({type(e).__name__}: {_first_line(e)}); "
                       "rerun to resume the download") from None
    return checked(m, folder)


def checked(m: HubModel, folder: Path) -> Path:
    """``folder`` when it holds a transformers checkpoint with its tokenizer; else HubError."""
    lacks = [what for what, names in (("config.json", ("config.json",)),
                                      ("safetensors weights", ("model.safetensors", "model.safetensors.index.json")),
                                      ("tokenizer files", TOKENIZER_FILES))
             if not any((folder / n).is_file() for n in names)]
    if lacks:
        raise HubError(f"{m.label}: the snapshot {folder} has no {' and no '.join(lacks)}; "
                       "cascadec reads Hugging Face transformers checkpoints (safetensors) with their tokenizer")
    return folder


def _access(m: HubModel, e: Exception) -> str:
    return (f"{m.label}: the hub has no repository {m.repo}, or it is gated or private ({type(e).__name__}); "
            f"check the id, accept its licence on the hub and log in with `hf auth login`")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class Revisions:
    """The commit each hub model of a plan names, resolved at most once per command.

    ``local_only``: read the cache's refs only (`status`); else ask the hub (`run`)."""

    def __init__(self, plan: dict, *, local_only: bool):
        self.plan, self.local_only = plan, local_only
        self.memo: dict[str, str | HubError] = {}

    def commit(self, m: HubModel) -> str:
        """The commit of ``m``; HubError (remembered: asked once) when it cannot be resolved."""
        if m.name not in self.memo:
            try:
                self.memo[m.name] = resolve(m, local_only=self.local_only)
            except HubError as e:
                self.memo[m.name] = e
        found = self.memo[m.name]
        if isinstance(found, HubError):
            raise found
        return found

    def record(self, stage: dict) -> dict:
        """{model: {hub, revision, commit}} of the hub models ``stage`` reads (its manifest's
        `hub_revisions`); HubError when one cannot be resolved."""
        return {m.name: {"hub": m.repo, "revision": m.revision, "commit": self.commit(m)}
                for m in hub_models(self.plan, stage)}

    def changes(self, stage: dict, recorded: dict) -> list[str]:
        """Why ``stage``'s hub models differ from the manifest's `hub_revisions` (empty: same).
        A revision that cannot be resolved now is not checked; one the hub denies is a change."""
        out = []
        for m in hub_models(self.plan, stage):
            try:
                now = self.commit(m)
            except HubError as e:
                if not e.unreachable:
                    out.append(str(e))
                continue
            then = (recorded.get(m.name) or {}).get("commit")
            if then != now:
                out.append(f"{m.label} moved from {then[:12] if then else 'nothing recorded'} to {now[:12]}")
        return out

    def lines(self) -> list[str]:
        """One line per hub model of the plan for `status`: what its revision resolves to here."""
        out = []
        for name in sorted(self.plan.get("models") or {}):
            m = hub_model(self.plan, name)
            if m is None:
                continue
            try:
                commit = self.commit(m)
                how = "pinned" if m.pinned else "local cache" if self.local_only else "hub"
                out.append(f"hub   {m.label} = {commit} ({how})")
            except HubError as e:
                out.append(f"hub   {m.label} = not checked ({e.short})")
        return out
