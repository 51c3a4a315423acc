"""Assemble, verify and publish the VideoNSA Hub repository: ``python push_to_hub.py SOURCE --output hub/ ...``
(``--help`` explains every option). The work is done by :mod:`videonsa.hub`; this file is the command beside the
files it publishes (installed as ``videonsa-push`` too)."""

import sys

from videonsa.hub.cli import main

if __name__ == "__main__":
    sys.exit(main())
