"""`grok3d`: the command line client of the grok3d REST API (API.md)."""
