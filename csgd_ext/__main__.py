import sys

from csgd_ext.apps.cli import main

sys.exit(main())
