"""The report: a reader of run folders and a static HTML site rendered from what it read."""
