"""`python -m vidrd.runtime.cli`: the `vidrd` command."""
import sys

from vidrd.runtime.cli import main

sys.exit(main())
