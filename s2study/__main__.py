import sys

from s2study.cli import main

sys.exit(main())
