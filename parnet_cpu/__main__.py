import sys

from parnet_cpu.cli import main

sys.exit(main())
