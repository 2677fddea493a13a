import sys

from aimv2.cli import main

if __name__ == "__main__":  # not when a multiprocessing fork server or spawn imports it
    sys.exit(main())
