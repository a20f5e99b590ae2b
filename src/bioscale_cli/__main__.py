import sys

from bioscale_cli import main

sys.exit(main())
