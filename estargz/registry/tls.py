"""TLS for registry connections, the way containers/image and Docker set it
up: the system's CAs plus the ``*.crt`` files of a certificate directory
(``certs.d``), a ``NAME.cert``/``NAME.key`` pair as the client certificate.
"""

from __future__ import annotations

import os
import ssl
from typing import Any

import requests
import requests.adapters
import urllib3

from .._exceptions import InvalidInput
from .deadline import WatchedAdapter
from .errors import reason_text

#: Per-host certificate directories containers/image and Docker read when
#: no directory is given (``HOST`` is replaced by ``host[:port]``).
DEFAULT_CERT_DIRS = ("~/.config/containers/certs.d/HOST", "/etc/containers/certs.d/HOST",
                     "/etc/docker/certs.d/HOST")


class ContextAdapter(WatchedAdapter):
    """An adapter that uses our own :class:`ssl.SSLContext`.

    requests otherwise trusts certifi's bundle *or* a file given as
    ``verify``, never "the system's CAs plus these", and it has no way to take
    a client key from the certificate directory layout; a context does both.
    How requests passes TLS settings to urllib3 changed within 2.32.x, so the
    connection is chosen here, from pools that were given the context.
    """

    def __init__(self, context: ssl.SSLContext, **kwargs: Any) -> None:
        self._context = context
        # urllib3 sets the context's verify_mode from cert_reqs on each connect.
        self._cert_reqs = "CERT_NONE" if context.verify_mode == ssl.CERT_NONE else "CERT_REQUIRED"
        super().__init__(**kwargs)

    def init_poolmanager(self, connections: int, maxsize: int, block: bool = False,
                         **pool_kwargs: Any) -> None:
        pool_kwargs.update(ssl_context=self._context, cert_reqs=self._cert_reqs)
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        proxy_kwargs.update(ssl_context=self._context, cert_reqs=self._cert_reqs)
        return super().proxy_manager_for(proxy, **proxy_kwargs)

    def get_connection_with_tls_context(self, request: Any, verify: Any,
                                        proxies: Any = None,
                                        cert: Any = None) -> Any:
        proxy = requests.utils.select_proxy(request.url, proxies)
        if proxy:
            proxy = requests.utils.prepend_scheme_if_needed(proxy, "http")
            return self.proxy_manager_for(proxy).connection_from_url(request.url)
        return self.poolmanager.connection_from_url(request.url)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        # The context already holds the trust anchors and the client key;
        # requests would otherwise point the connection at certifi's bundle.
        return None


def ssl_context(host: str, tls_verify: bool, cert_dir: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if ctx.cert_store_stats().get("x509_ca", 0) == 0:
        try:  # a system without a CA bundle: fall back to certifi's, as requests would
            import certifi  # optional: only on such a system
            ctx.load_verify_locations(certifi.where())
        except (ImportError, OSError, ssl.SSLError):
            pass
    if not tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif getattr(urllib3, "__version__", "").startswith("1."):  # not re-exported in stubs
        # urllib3 1.x sends no SNI to an IP address, which OpenSSL's own host
        # check refuses; it matches the hostname itself when the context does not.
        ctx.check_hostname = False
    if cert_dir is not None:
        if not os.path.isdir(cert_dir):
            raise InvalidInput(f"certificate directory {cert_dir} does not exist")
        dirs = [cert_dir]
    else:
        dirs = [os.path.expanduser(d.replace("HOST", host)) for d in DEFAULT_CERT_DIRS]
        dirs = [d for d in dirs if os.path.isdir(d)]
    for d in dirs:
        load_cert_dir(ctx, d)
    return ctx


def load_cert_dir(ctx: ssl.SSLContext, directory: str) -> None:
    """Load a containers-style ``certs.d`` directory: ``*.crt`` are CAs,
    ``NAME.cert`` + ``NAME.key`` a client certificate (the first pair)."""
    try:
        names = sorted(os.listdir(directory))
    except OSError as e:
        raise InvalidInput(f"cannot read certificate directory {directory}: {e.strerror}") from None
    client_loaded = False
    for name in names:
        path = os.path.join(directory, name)
        try:
            if name.endswith(".crt"):
                ctx.load_verify_locations(cafile=path)
            elif name.endswith(".cert"):
                key = path[:-len(".cert")] + ".key"
                if not os.path.exists(key):
                    raise InvalidInput(f"client certificate {path} has no matching key {key}")
                if not client_loaded:
                    ctx.load_cert_chain(path, key)
                    client_loaded = True
            elif name.endswith(".key") and not os.path.exists(path[:-len(".key")] + ".cert"):
                raise InvalidInput(f"client key {path} has no matching certificate "
                                   f"{path[:-len('.key')]}.cert")
        except (ssl.SSLError, OSError, ValueError) as e:
            raise InvalidInput(f"cannot load {path}: {reason_text(e)}") from None
