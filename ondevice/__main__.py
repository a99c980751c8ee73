"""``python -m ondevice``."""

from ondevice.cli import main

raise SystemExit(main())
