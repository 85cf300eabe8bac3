"""`python -m grok3d_cli`: the same as the `grok3d` console script."""

from grok3d_cli.main import main

raise SystemExit(main())
