"""Profiling without root: the image flattened onto a tmpfs in a user
namespace of our own.

* :mod:`.userns`: run a function as root of a new user, mount and PID
  namespace, in a helper process (``python -m profiler.rootless``); as
  root, the same without the user namespace (:mod:`profiler.rootful`);
* :mod:`.cgroup`: memory and pids limits where cgroups are delegated;
* :mod:`.profile`: :func:`profile_rootless` and the memory check.
"""

from .profile import WRITE_ROOM, available_memory, check_memory, profile_rootless
from .userns import call_in_namespaces, call_in_userns, send_message

__all__ = ["WRITE_ROOM", "available_memory", "call_in_namespaces", "call_in_userns",
           "check_memory", "profile_rootless", "send_message"]
