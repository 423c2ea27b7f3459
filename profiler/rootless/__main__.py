"""``python -m profiler.rootless FD``: the user-namespace helper of
:func:`profiler.rootless.userns.call_in_userns`.

It runs through the package (``profiler.rootless.userns``), not as a
``__main__`` copy of that module: the job calls
``profiler.rootless.userns.send_message``, which must see the descriptor
:func:`~profiler.rootless.userns.helper_main` sets.
"""

import sys

from profiler.rootless.userns import helper_main

sys.exit(helper_main(sys.argv[1:]))
