import sys

from cmn.prepare.cli import main

sys.exit(main())
