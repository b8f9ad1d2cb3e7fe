"""Build engine configs the way ``LLM(...)`` and ``vllm serve`` do, and record
what each raised (run as a script by ``test_startup_errors``).

    python startup_probe.py CASES.json RESULT.json

CASES.json maps a case name to ``EngineArgs`` keyword arguments; RESULT.json
maps it to ``"ExceptionType: message"``, or null when the config was built.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    from vllm.engine.arg_utils import EngineArgs

    cases = json.loads(Path(sys.argv[1]).read_text())
    results: dict[str, str | None] = {}
    for name, kwargs in cases.items():
        try:
            EngineArgs(**kwargs).create_engine_config()
            results[name] = None
        except Exception as e:  # the test reads what was raised
            results[name] = f"{type(e).__name__}: {e}"
    Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
