"""What the TripoSR service and its callers agree on, beyond GLB bytes. Kept free of torch, so the API service
can import it without loading the model's libraries."""

# The answer, within a batch, for a picture that did not decode: a batch answers item by item, so one bad picture
# must not fail the others. An empty answer (b"") means the picture decoded but no surface was found.
UNREADABLE = b"unreadable picture"
