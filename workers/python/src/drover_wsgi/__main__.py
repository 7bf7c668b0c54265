"""``python -m drover_wsgi [options] module:app``."""

import sys

from drover_wsgi import main

sys.exit(main())
