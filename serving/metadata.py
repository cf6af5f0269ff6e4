"""The metadata keys written into exported ONNX models and the weights checksum.

Pure Python and numpy: shared by the exporter and the torch-free runtime.
"""

from __future__ import annotations

import hashlib

FORMAT_VERSION = "1"
PREFIX = "divtri."
KEYS = ("format_version", "package_version", "graph", "n_features", "input_shape",
        "sample_shape", "score_rule", "offset", "contamination", "weights_sha256")


def weights_sha256(initializers) -> str:
    """sha256 over (name, raw bytes) of every initializer, in name order.

    ``initializers`` yields ``(name, bytes)``; the exporter passes the graph's initializers
    after export, the runtime the ones it reads back, so both hash the same bytes.
    """
    digest = hashlib.sha256()
    for name, raw in sorted(initializers):
        digest.update(name.encode())
        digest.update(len(raw).to_bytes(8, "little"))
        digest.update(raw)
    return digest.hexdigest()
