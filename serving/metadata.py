"""The metadata keys written into exported ONNX models and the weights checksum.

Pure Python and numpy: shared by the exporter and the torch-free runtime.
"""

from __future__ import annotations

import hashlib

# 2: a checksum (key "sha256") over the whole graph and the metadata, not only the weights.
# Ints, like the saved model's; ONNX metadata holds them as strings.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
PREFIX = "divtri."
KEYS = ("format_version", "package_version", "graph", "n_features", "input_shape",
        "sample_shape", "score_rule", "offset", "contamination", "weights_sha256")


def prefixed(props: dict[str, str]) -> dict[str, str]:
    """The package's metadata entries as written into a model, each key under ``PREFIX``."""
    return {PREFIX + key: value for key, value in props.items()}


def unprefixed(metadata_props) -> dict[str, str]:
    """The package's entries of a model's ``metadata_props``, keys without ``PREFIX``."""
    return {p.key[len(PREFIX):]: p.value for p in metadata_props if p.key.startswith(PREFIX)}


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


def model_sha256(graph_bytes: bytes, props: dict[str, str]) -> str:
    """sha256 over the serialised graph (nodes, their attributes, initializers, inputs and
    outputs) and every metadata entry but the checksum itself.

    ``graph_bytes`` is ``model.graph.SerializeToString(deterministic=True)``: the exporter
    and the runtime serialise the same message the same way.
    """
    digest = hashlib.sha256(graph_bytes)
    for key, value in sorted(props.items()):
        if key != "sha256":
            digest.update(f"{len(key)}:{key}={len(value)}:{value};".encode())
    return digest.hexdigest()
