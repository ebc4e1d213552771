import sys

from hv.command import main

sys.exit(main())
