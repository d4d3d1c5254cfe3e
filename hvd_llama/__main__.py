"""`python -m hvd_llama` is `python -m hvd_llama.train`."""

import sys

from hvd_llama.train import main

sys.exit(main())
