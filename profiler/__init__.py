"""Workload profiling for ``estargz optimize``: run the image's entrypoint in a
sandbox, record which files start-up reads, map them to layers.

Packages by job, each importing only those listed below it (see
docs/profiling.md, "Module map"):

* :mod:`.optimize`: the orchestration of ``estargz optimize``;
* :mod:`.capabilities`: what this machine allows (``estargz doctor``);
* :mod:`.rootless`: profiling without root, in a user namespace;
* :mod:`.sandbox`: the OCI spec, users, and the runtime's container life;
* :mod:`.report`, :mod:`.record`: what was found, for people and for the converter;
* :mod:`.rootfs`: layer extraction, the overlay, the flat root, the layer map;
* :mod:`.fanotify`: fanotify, classic and FID mode;
* :mod:`.linux`, :mod:`.errors`: libc, mounts, namespaces, signals; the error type.

Kept free of imports: the user-namespace helper (``python -m
profiler.rootless``) and the capability probe run as nobody import
subpackages without pulling in the rest.
"""
