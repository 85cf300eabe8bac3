"""What the TripoSR service and its callers agree on, beyond GLB bytes. Kept free of torch, so the API service
can import it without loading the model's libraries."""

import re
from pathlib import Path

_STORE_TAG = re.compile(r"[a-z0-9][a-z0-9_.-]*(:[A-Za-z0-9_.-]+)?")

# The answer, within a batch, for a picture that did not decode: a batch answers item by item, so one bad picture
# must not fail the others. An empty answer (b"") means the picture decoded but no surface was found.
UNREADABLE = b"unreadable picture"


def is_store_tag(source: str) -> bool:
    """A TRIPOSR_MODEL value naming the BentoML model store (`triposr:abc123`, `triposr`), not an existing folder."""
    return not Path(source).is_dir() and _STORE_TAG.fullmatch(source) is not None
