import sys

from cmn.explain.cli import main

sys.exit(main())
