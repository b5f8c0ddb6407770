import sys

from steerlm_kernels.cli import main

sys.exit(main())
