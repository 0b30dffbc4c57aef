"""`python -m node.cli`: the same program as the `sfumesh` command (local launchers use it)."""

from node.cli.main import main

raise SystemExit(main())
