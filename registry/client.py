"""``Registry``, the class users hold: the local store (:class:`~finetune_sdk.registry.local.LocalRegistry`) plus
pushing to and pulling from the Hugging Face Hub (:mod:`finetune_sdk.registry.hub`).

The local store knows nothing of the Hub client, the Hub client works on a local store, and this class joins the
two, so the modules import one way: ``client -> hub -> local``.

Example:
    >>> from finetune_sdk.registry import Registry
    >>> registry = Registry("/tmp/my-registry")  # doctest: +SKIP
    >>> registry.push("support-bot@1", "org/support-bot")  # doctest: +SKIP
    >>> Registry("/tmp/other").pull("hf://org/support-bot@v1").ref  # doctest: +SKIP
    'support-bot@1'
"""

from __future__ import annotations

from typing import Any

from finetune_sdk.registry import hub
from finetune_sdk.registry.local import AdapterVersion, LocalRegistry
from finetune_sdk.progress import activity


class Registry(LocalRegistry):
    """Versions, aliases, tags and lineage of fine-tuning results under ``home`` (see
    :class:`~finetune_sdk.registry.local.LocalRegistry`), pushed to and pulled from a Hub.

    Example:
        >>> from finetune_sdk.registry import Registry
        >>> registry = Registry("/tmp/my-registry")  # doctest: +SKIP
        >>> v = registry.publish("finetune-runs/support", "support-bot", aliases=["staging"])  # doctest: +SKIP
        >>> registry.alias("support-bot@1", "production")  # doctest: +SKIP
        >>> registry.path("support-bot@production")  # a folder finetune_sdk.load() reads  # doctest: +SKIP
    """

    def push(self, ref: str, repo_id: str, **kwargs: Any) -> dict[str, Any]:
        """Push a version to a Hub repo (one commit tagged ``v<N>``; aliases as branches); see
        :func:`finetune_sdk.registry.hub.push` for ``endpoint``, ``token`` and ``private``.

        Returns:
            ``{"repo_id", "commit", "tag", "aliases", "url"}``.

        Raises:
            RegistryError: an unknown ``ref``, a bad ``repo_id``, offline mode, a refused or failed Hub call.
        """
        with activity(f"pushing {ref} to the Hub repo {repo_id}"):
            return hub.push(self, ref, repo_id, **kwargs)

    def pull(self, ref: str, **kwargs: Any) -> AdapterVersion:
        """Pull ``hf://org/repo[@vN|@alias]`` into this registry, verifying every file; see
        :func:`finetune_sdk.registry.hub.pull` for ``endpoint``, ``token`` and ``name``.

        Raises:
            RegistryError: not a Hub reference, a refused or failed Hub call, a hostile ``registry.json``.
            IntegrityError: a downloaded file that doesn't match its recorded sha256.
        """
        with activity(f"pulling {ref}"):
            return hub.pull(self, ref, **kwargs)


__all__ = ["Registry"]
