import sys

from patchslim_ext.cli import main

sys.exit(main())
