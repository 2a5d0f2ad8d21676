"""Data: our latent-record format and its readers and writers (records, sources, the grain input
pipeline, aspect buckets) and the library half of ``sd3-build-dataset`` (image sources, the
chunked builder)."""
