import sys

from vdisk.cli import main

sys.exit(main())
