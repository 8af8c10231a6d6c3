"""``python -m vaelab`` (also what ``torchrun -m vaelab`` runs)."""

from .cli import main

raise SystemExit(main())
