"""``python -m profiler.rootless FD [--no-user-namespace]``: the namespace
helper of :func:`profiler.rootless.userns.call_in_namespaces` (rootless, and
as root without the user namespace).

It runs through the package (``profiler.rootless.userns``), not as a
``__main__`` copy of that module: the job calls
``profiler.rootless.userns.send_message``, which must see the descriptor
:func:`~profiler.rootless.userns.helper_main` sets.
"""

import sys

from profiler.rootless.userns import helper_main

sys.exit(helper_main(sys.argv[1:]))
