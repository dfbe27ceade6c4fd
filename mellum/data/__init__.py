"""Training data: sources, license governance, filters, secrets, dedup, corpus, samples, shards and mixtures."""
