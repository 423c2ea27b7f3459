"""Workload profiling for ``estargz optimize``: run the image's entrypoint in a
sandbox, record which files start-up reads, map them to layers.

As root (``rootfs.py`` overlay, ``sandbox.py``, ``fanotify.py``) or without
(``rootless.py``: ``userns.py``, ``flatroot.py``, ``fanotify_fid.py``); see
docs/profiling.md.
"""
