"""The transports, one module each, as containers/image has them: ``oci:``,
``oci-archive:``, ``docker-archive:``, ``docker://`` and ``docker-daemon:``.

Importing this package registers all of them by name with
:mod:`estargz.image.transport`; nothing else needs to know them.
"""

from . import docker, docker_archive, docker_daemon, oci, oci_archive  # noqa: F401  (registers)
