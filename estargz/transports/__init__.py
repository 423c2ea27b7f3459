"""The transports, one module each, as containers/image has them: ``oci:``
(:mod:`.oci`), ``oci-archive:`` (:mod:`.oci_archive`), ``docker-archive:``
(:mod:`.docker_archive`), ``docker://`` (:mod:`.docker`) and
``docker-daemon:`` (:mod:`.docker_daemon`).

Each module registers its transport with :mod:`estargz.image.transport`
when imported; that module imports a built-in one the first time its name
is used, so only the transports in use are loaded (``docker://`` brings in
``requests``, ``docker-daemon:`` the ``docker`` package).
"""
