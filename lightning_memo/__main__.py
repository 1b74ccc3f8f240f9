"""``python -m lightning_memo``: the ``lightning-memo`` command (see :mod:`lightning_memo.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
