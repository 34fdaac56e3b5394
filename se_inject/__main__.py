"""``python -m se_inject`` runs the ``se-inject`` command."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
