"""Images: references, descriptors and media types, the source and
destination interfaces with the registry of transports by name, whole-image
conversion and the records that steer it. Builds on :mod:`estargz.layer`;
knows no particular transport (those are :mod:`estargz.transports`).
Public names are re-exported by :mod:`estargz`.
"""
