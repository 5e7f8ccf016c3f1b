import sys

from vitfast.cli import main

sys.exit(main())
