"""`python -m ratchet` is the `ratchet` command."""

import sys

from ratchet._cli import main

sys.exit(main())
