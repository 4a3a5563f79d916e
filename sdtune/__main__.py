import sys

from sdtune.commands.cli import main

sys.exit(main())
