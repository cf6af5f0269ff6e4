"""The names of the methods the benchmarks compare: plain constants, so that the command
line can list them without importing the methods (and torch)."""

OURS = ("triangle", "vae_ablation")
SKLEARN_PEERS = ("isolation_forest", "lof", "ocsvm")
PYOD_PEERS = ("pyod_knn", "pyod_ecod", "pyod_copod", "pyod_hbos", "pyod_pca", "pyod_vae")
ALL_METHODS = (*OURS, *SKLEARN_PEERS, *PYOD_PEERS)

DEFAULT_METHODS = (*OURS, *SKLEARN_PEERS)
# On load_digits a plain nearest-neighbour score in pixel space is the strongest peer.
DIGITS_METHODS = (*DEFAULT_METHODS, "pyod_knn")
