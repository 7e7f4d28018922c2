"""``python -m cloud_coordinator`` runs the coordinator CLI."""

import sys

from cloud_coordinator.cli import main

sys.exit(main())
