"""What the Python test peers share: facts printed as `key: value` lines, and a `main` that
runs the peer under anyio and reports every exception.
"""

import json
import sys
import traceback
from typing import Any, Callable, Sequence


def emit(key: str, value: object) -> None:
    """Prints one fact as a `key: value` line, the value as JSON."""
    print(f"{key}: {json.dumps(value)}", flush=True)


def run_main(
    doc: str | None,
    run: Callable[..., Any],
    parse: Callable[[list[str]], Sequence[Any]],
    arg_counts: Sequence[int] = (4,),
) -> int:
    """Runs `run(*parse(sys.argv))` under anyio: 2 (with the usage on stderr) when sys.argv
    has none of `arg_counts` entries, 1 (with the traceback on stderr) on any exception, else 0.
    """
    import anyio

    if len(sys.argv) not in arg_counts:
        print(doc, file=sys.stderr)
        return 2
    try:
        anyio.run(run, *parse(sys.argv))
    except BaseException:  # noqa: BLE001 - report everything, including exception groups
        traceback.print_exc()
        return 1
    return 0
