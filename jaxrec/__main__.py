"""``python -m jaxrec ...``: the same as the ``jaxrec`` command (``cli.main`` with no argv restarts
this process for huge pages with ``sys.orig_argv``, which keeps the ``-m jaxrec``)."""

import sys

from jaxrec.cli import main

if __name__ == "__main__":
  sys.exit(main())
