import sys

from pcd_kernels.train.cli import main

sys.exit(main())
