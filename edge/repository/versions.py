"""Which versions of a model to serve: Triton's ``version_policy``.

``latest { num_versions: N }`` (the default, N = 1), ``all {}`` and
``specific { versions: [...] }``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edge.repository.model_config import ModelConfig


@dataclass(frozen=True)
class VersionSelection:
    """The versions to serve, and those the policy names that do not exist on disk."""

    serve: tuple[int, ...]
    missing: tuple[int, ...] = ()


def select_versions(config: ModelConfig, available: Sequence[int]) -> VersionSelection:
    """Apply ``config.version_policy`` to the version numbers found on disk (any order)."""
    have = sorted(set(available))
    policy = config.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return VersionSelection(tuple(have))
    if choice == "specific":
        wanted = sorted(set(int(v) for v in policy.specific.versions))
        return VersionSelection(tuple(v for v in wanted if v in have),
                                tuple(v for v in wanted if v not in have))
    count = policy.latest.num_versions if choice == "latest" else 1
    count = max(1, count)
    return VersionSelection(tuple(have[-count:]))
