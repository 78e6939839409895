"""API keys: which environment an `X-API-KEY` header belongs to."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from loader.errors import ConfigError


def _digest(value: bytes) -> bytes:
    # Equal-length digests, so compare_digest does not leak a key's length either.
    return hashlib.sha256(value).digest()


class ApiKeys:
    """The accepted keys and their environments; lookups take the same time whatever the key."""

    def __init__(self, api_keys: Mapping[str, str]):
        problems = []
        if not api_keys:
            problems.append(("api_keys", "give at least one KEY=ENVIRONMENT"))
        for position, (key, environment) in enumerate(api_keys.items(), start=1):
            # Never quote a key: error messages end up in logs.
            if not isinstance(key, str) or not key:
                problems.append(("api_keys", f"key {position} is empty"))
            if not isinstance(environment, str) or not environment:
                problems.append(("api_keys", f"key {position} has an empty environment"))
        if problems:
            raise ConfigError(problems)
        self._keys = [(_digest(key.encode()), environment) for key, environment in api_keys.items()]

    @property
    def environments(self) -> list[str]:
        """The environments served, each once, in the order given."""
        return list(dict.fromkeys(environment for _, environment in self._keys))

    def environment_for(self, presented: bytes | None) -> str | None:
        """The environment of the presented key, or None for a missing or unknown key."""
        if presented is None:
            return None
        presented_digest = _digest(presented)
        found = None
        # Compare against every key, without stopping at a match, so the time
        # taken does not tell which key (or how many) matched.
        for key_digest, environment in self._keys:
            if hmac.compare_digest(presented_digest, key_digest) and found is None:
                found = environment
        return found
