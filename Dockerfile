# The estargz tool as a container image: `estargz convert`, `layer …` and
# `estargz optimize` (runc and fanotify inside; privileges in docs/pipelines.md).
#
#   docker build --network host --build-arg VERSION=0.1.0 -t estargz:0.1.0 .
#                                                              # from debian:bookworm-slim
#   scripts/build-tool-image.py                                # the same from a base made
#                                                              # here (debootstrap), cached
#
# BASE is any Debian bookworm image: Docker Hub's debian:bookworm-slim, or the
# one scripts/build-tool-image.py imports from a debootstrap minbase rootfs
# (for machines that reach only the Debian and PyPI mirrors).  Nothing is
# fetched but Debian packages (apt) and Python packages (PyPI).
ARG BASE=debian:bookworm-slim

# --- build: the package and its dependencies into a venv ----------------------
FROM ${BASE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip \
 && rm -rf /var/lib/apt/lists/*
# Only what the package is built from (the context is an allowlist, see
# .dockerignore), and wheels/ when the context brings the dependencies
# (scripts/build-tool-image.py downloads them on the host, whose certificate
# setup the build must not need): then nothing is fetched from an index.
COPY . /src
# A venv without pip: Debian's pip installs into it from outside (--python),
# so the image carries neither pip nor setuptools.  The wheel is built here,
# from the sources just copied.
RUN python3 -m venv --without-pip /opt/estargz \
 && if [ -d /src/wheels ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS=/src/wheels; fi \
 && python3 -m pip --python /opt/estargz/bin/python install --no-cache-dir /src \
 && /opt/estargz/bin/estargz --version \
 # zstandard ships two backends; the C one is what it imports unless told
 # otherwise (PYTHON_ZSTANDARD_IMPORT_POLICY), the CFFI one is 12 MB more.
 && rm -f /opt/estargz/lib/python3*/site-packages/zstandard/_cffi.*.so

# --- the image -------------------------------------------------------------------
FROM ${BASE}
# runc: the sandbox `optimize` profiles in; python3: the interpreter of the venv.
# No recommends, no apt lists: what the tool runs is all there is.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 runc \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/cache/debconf/*-old \
           /var/log/apt /var/log/dpkg.log /var/log/alternatives.log
COPY --from=build /opt/estargz /opt/estargz
COPY container/entrypoint.sh /usr/local/bin/estargz-entrypoint
# The seccomp profile `optimize` needs in a container, for the host to read:
#   docker run --rm --entrypoint cat estargz:VERSION /usr/share/estargz/seccomp.json
COPY container/seccomp.json /usr/share/estargz/seccomp.json
ENV PATH=/opt/estargz/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1
ARG VERSION=unknown
LABEL org.opencontainers.image.title=estargz \
      org.opencontainers.image.version=${VERSION} \
      org.opencontainers.image.description="Convert container images to eStargz and profile their start-up"
WORKDIR /work
ENTRYPOINT ["estargz-entrypoint"]
CMD ["--help"]
