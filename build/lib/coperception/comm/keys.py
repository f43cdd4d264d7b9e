"""Per-agent HMAC keys: a JSON file `{"<agent id>": "<hex key>"}` provisioned to the agents.

Keys are random bytes from the operating system, never derived from anything public; a file that
holds them is written readable by its owner only.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Iterable

from coperception.errors import DataFormatError
from coperception.io import atomic_write_bytes, read_json

MIN_KEY_BYTES = 16


def load_keys(path: str | Path) -> dict[int, bytes]:
    """Agent id -> key; a malformed file names the entry that is wrong."""
    data = read_json(path)
    if not isinstance(data, dict) or not data:
        raise DataFormatError(path, 'expected a non-empty mapping {"<agent id>": "<hex key>"}')
    keys = {}
    for agent, text in data.items():
        try:
            agent_id = int(agent)
            key = bytes.fromhex(text)
        except (TypeError, ValueError):
            raise DataFormatError(path, f"entry {agent!r}: expected an integer agent id and a hex key") from None
        if len(key) < MIN_KEY_BYTES:
            raise DataFormatError(path, f"entry {agent!r}: key of {len(key)} bytes, at least {MIN_KEY_BYTES} needed")
        keys[agent_id] = key
    return keys


def write_keys(path: str | Path, agent_ids: Iterable[int], key_bytes: int = 32) -> dict[int, bytes]:
    """Fresh random keys for `agent_ids`, written atomically with mode 0600; returns them."""
    keys = {int(a): secrets.token_bytes(key_bytes) for a in agent_ids}
    atomic_write_bytes(path, json.dumps({str(a): k.hex() for a, k in keys.items()}, indent=1).encode(), mode=0o600)
    return keys
