import sys

from aimv2.cli import main

sys.exit(main())
