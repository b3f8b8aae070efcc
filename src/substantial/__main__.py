"""``python -m substantial``: the command line (needs the ``cli`` extra)."""

from __future__ import annotations

import sys


def _main() -> None:
    try:
        from substantial.cli import main
    except ImportError as exc:
        print(
            f"error: the command line needs {exc.name!r}: pip install 'substantial[cli]'",
            file=sys.stderr,
        )
        sys.exit(2)
    main()


if __name__ == "__main__":
    _main()
