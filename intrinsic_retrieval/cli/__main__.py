"""``python -m intrinsic_retrieval.cli``."""

from . import main

raise SystemExit(main())
