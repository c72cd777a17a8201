"""Process-wide switches that keep every library off the network. Imported first by anything that loads models."""

import os

# Models come from installed packages; a hub lookup would hang or fail on machines without network.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")
# unstructured phones home to an analytics host at import time unless told not to.
os.environ.setdefault("SCARF_NO_ANALYTICS", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("UNSTRUCTURED_DISABLE_NOTICE", "1")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")
# Worker processes are forked/spawned for parsing; the Rust tokenizers' own threads would deadlock after fork.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
