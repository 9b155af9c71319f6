import sys

from yi_local.cli import main

sys.exit(main())
