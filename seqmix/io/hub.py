"""Hugging Face hub names: "org/name" resolved to a local snapshot (huggingface_hub's snapshot_download), errors
turned into messages that say what to do. A local directory always wins and never needs huggingface_hub."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

from seqmix.io.files import BIN_INDEX_NAME, BIN_NAME, CONFIG_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, PathLike

_REPO_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]*[A-Za-z0-9_]")
_SAFETENSORS_FILES = [CONFIG_NAME, "tokenizer_config.json", WEIGHTS_NAME, "model-*.safetensors", WEIGHTS_INDEX_NAME]
_BIN_FILES = [CONFIG_NAME, "tokenizer_config.json", BIN_NAME, "pytorch_model-*.bin", BIN_INDEX_NAME]


def resolve_model_dir(name_or_path: PathLike, *, revision: Optional[str] = None, cache_dir: Optional[PathLike] = None,
                      local_files_only: bool = False) -> Path:
    """The local directory of a model: an existing directory as is (it wins over a hub repo of the same name),
    else the Hugging Face hub repo "org/name" downloaded into (or found in) the hub cache by huggingface_hub's
    `snapshot_download`. Only config.json and the weights are fetched: safetensors when the repo has them, else
    pytorch_model*.bin. A `Path` is always a local path. Errors (FileNotFoundError, PermissionError for gated
    repos, ImportError without huggingface_hub) name the repo and say what to do."""
    path = Path(name_or_path)
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to hub names, but {str(path)!r} is a local directory")
        return path
    name = str(name_or_path)
    if path.exists():
        raise NotADirectoryError(f"{name} is a file; pass the model directory that holds {CONFIG_NAME}")
    if isinstance(name_or_path, Path) or not _REPO_ID.fullmatch(name) or ".." in name or "--" in name:
        raise FileNotFoundError(f"no directory {name!r}; pass an existing model directory or a Hugging Face hub "
                                f"name of the form 'org/name' (e.g. 'hazyresearch/based-360m')")
    snapshot = _snapshot(name, _SAFETENSORS_FILES, revision, cache_dir, local_files_only)
    if not any(snapshot.glob("*.safetensors")) and not (snapshot / WEIGHTS_INDEX_NAME).is_file():
        snapshot = _snapshot(name, _BIN_FILES, revision, cache_dir, local_files_only)
    return snapshot


def _snapshot(repo_id: str, patterns: list[str], revision: Optional[str], cache_dir: Optional[PathLike],
              local_files_only: bool) -> Path:
    """snapshot_download, its errors turned into messages that say what to do."""
    try:
        from huggingface_hub import errors as hf, snapshot_download
    except ImportError as e:
        raise ImportError(f"{repo_id!r} is not a local directory, and downloading it from the Hugging Face hub "
                          f"needs huggingface_hub: pip install huggingface_hub") from e
    rev = f" (revision {revision!r})" if revision else ""
    local_hint = "or pass a local directory holding config.json and the weights"
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                      local_files_only=local_files_only, allow_patterns=patterns))
    except hf.GatedRepoError as e:
        raise PermissionError(f"{repo_id} is a gated repository: accept its terms at https://huggingface.co/"
                              f"{repo_id} and log in (`hf auth login`), {local_hint}") from e
    except hf.RepositoryNotFoundError as e:
        raise FileNotFoundError(f"{repo_id!r} is neither a local directory nor a model repository on the Hugging "
                                f"Face hub (a private one needs `hf auth login`); check the name, {local_hint}") from e
    except hf.RevisionNotFoundError as e:
        raise FileNotFoundError(f"{repo_id} has no revision {revision!r}; pass an existing branch, tag or "
                                f"commit") from e
    except hf.LocalEntryNotFoundError as e:  # not (completely) in the cache, and no download possible
        why = ("local_files_only=True forbids downloading it" if local_files_only
               else "the hub cannot be reached (no network, or huggingface_hub's offline mode)")
        where = f"cache {cache_dir}" if cache_dir is not None else "default cache"
        raise FileNotFoundError(f"{repo_id}{rev} is not in the Hugging Face {where} and {why}; download it once "
                                f"with network access (local_files_only=False), {local_hint}.\n({e})") from e
    except hf.HFValidationError as e:
        raise ValueError(f"{repo_id!r} is not a valid Hugging Face hub name: {e}") from e
    except hf.HfHubHTTPError as e:
        raise OSError(f"downloading {repo_id}{rev} from the Hugging Face hub failed: {e}\nRetry, pass "
                      f"local_files_only=True to use a cached copy, {local_hint}") from e
