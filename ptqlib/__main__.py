import sys

from ptqlib.cli import main

sys.exit(main())
