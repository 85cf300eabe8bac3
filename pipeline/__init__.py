"""grok3d's orchestration core: the REST API, the job store and the stages. Knows nothing of BentoML."""
