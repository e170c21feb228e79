"""`python -m obdconv`: like the `obdconv` console script.

`python -m` puts the working directory first on sys.path; a `json.py` or `peewee.py` there would
be imported instead of the real module. It is dropped here, before anything else is imported,
unless obdconv itself was found there (a checkout run in place). (A directory holding its own
`obdconv/` package runs that instead of this file: use the console script or `python -P -m`.)
Only `os` and `sys`, loaded at interpreter start, are used before that.
"""

import os
import sys

if (not sys.flags.safe_path and sys.path and sys.path[0]
        and os.path.realpath(sys.path[0]) == os.path.realpath(os.getcwd())
        and os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        != os.path.realpath(sys.path[0])):
    del sys.path[0]

from obdconv.cli.main import main  # after the sys.path fix above, on purpose

raise SystemExit(main())
