import sys

from fxmerge.cli import main

sys.exit(main())
