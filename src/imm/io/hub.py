"""Files and models from the Hugging Face Hub, cache first and quick to fail offline.

A checkpoint path of the form ``hf://OWNER/REPO/PATH[@REVISION]`` (e.g. ``hf://lumaai/imm/cifar10.pt``)
names the file ``PATH`` of the model repository ``OWNER/REPO`` at ``REVISION`` (a branch, tag or commit;
default ``main``); ``hf://OWNER/REPO`` names the ``network.safetensors`` that ``imm push`` uploads. :func:`hub_file` returns its local copy in the Hugging Face cache (``HF_HOME``,
``HF_HUB_CACHE``), read without any request when it is there, downloaded once (``huggingface_hub``'s
``hf_hub_download``) when it is not. Offline (``HF_HUB_OFFLINE=1``), or when one request to the Hub
fails within :data:`REQUEST_TIMEOUT_S`, a file that is not cached is one :class:`HubError` line at once
instead of ``huggingface_hub``'s retries (about 30 s on a machine without internet).
"""

from __future__ import annotations

import shlex
from pathlib import Path

from imm.core.errors import MissingError

SCHEME = "hf://"
REQUEST_TIMEOUT_S = 10
REPO_NETWORK = "network.safetensors"  # the file hf://OWNER/REPO names: what imm push uploads


class HubError(MissingError):
    """A Hub file or model that is neither in the cache nor downloadable now; the message says what to do."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its class name when it has none)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def is_hub_path(path) -> bool:
    return isinstance(path, str) and path.startswith(SCHEME)


def parse_hub_path(path: str) -> tuple[str, str, str | None]:
    """``hf://OWNER/REPO[/PATH][@REVISION]`` -> (``OWNER/REPO``, ``PATH``, ``REVISION`` or None); without a
    ``PATH``, the network an ``imm push`` repository holds (:data:`REPO_NETWORK`)."""
    rest = path[len(SCHEME):]
    revision = None
    if "@" in rest.rsplit("/", 1)[-1]:
        rest, revision = rest.rsplit("@", 1)
    parts = rest.split("/")
    if len(parts) < 2 or not all(parts) or revision == "":
        raise HubError(f"{path}: a Hub path is hf://OWNER/REPO[/PATH][@REVISION], e.g. hf://lumaai/imm/cifar10.pt")
    return f"{parts[0]}/{parts[1]}", "/".join(parts[2:]) or REPO_NETWORK, revision


def check_reachable(what: str, advice: str, repo_id: str | None = None) -> None:
    """Raise :class:`HubError` when the Hub cannot be used now: ``HF_HUB_OFFLINE`` is set, or one request
    (no retries, :data:`REQUEST_TIMEOUT_S`) for ``repo_id`` fails. ``what`` is not in the cache."""
    from huggingface_hub import constants, model_info

    if constants.HF_HUB_OFFLINE:
        raise HubError(f"{what} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE "
                       f"is set: {advice}")
    try:
        model_info(repo_id, timeout=REQUEST_TIMEOUT_S)
    except Exception as e:
        raise HubError(f"{what} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the Hub cannot "
                       f"be reached ({first_line(e)}): {advice}") from None


def hub_file(path: str) -> Path:
    """The local copy of ``hf://OWNER/REPO/PATH[@REVISION]``: from the cache, else downloaded once."""
    from huggingface_hub import hf_hub_download

    repo_id, filename, revision = parse_hub_path(path)
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=True))
    except Exception:  # not cached (huggingface_hub's LocalEntryNotFoundError and kin)
        pass
    command = shlex.join(["hf", "download", repo_id, filename, *(["--revision", revision] if revision else [])])
    check_reachable(path, f"download it where there is internet ({command}) and copy the cache ($HF_HOME), or "
                          "pass the file's local path", repo_id)
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except Exception as e:
        raise HubError(f"{path}: download failed ({first_line(e)})") from None
