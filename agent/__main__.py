"""``python -m agent`` runs the agent daemon."""

import sys

from agent.cli import main

sys.exit(main())
