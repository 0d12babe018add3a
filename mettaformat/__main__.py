import sys

from mettaformat.cli.main import main

sys.exit(main())
