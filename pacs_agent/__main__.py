"""``python -m pacs_agent`` is the ``pacs-agent`` command."""

import sys

from pacs_agent.cli import main

sys.exit(main())
