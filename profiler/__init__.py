"""Workload profiling for ``estargz optimize`` (records which files start-up reads).

Empty until the profiling issue: the format and image layers come first.
"""
