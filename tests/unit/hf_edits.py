"""Edit a drafter's ``config.json`` dict for a test case."""

from __future__ import annotations

import copy
from typing import Any


def edited(hf: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A deep copy of ``hf`` with ``changes``: ``dflash_<field>=`` sets
    ``dflash_config[<field>]``, ``<key>=None`` removes ``<key>``, anything
    else sets it."""
    out = copy.deepcopy(hf)
    for key, value in changes.items():
        if key.startswith("dflash_"):
            out["dflash_config"][key.removeprefix("dflash_")] = value
        elif value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out
