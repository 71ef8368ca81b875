"""The whole workflow: TOML recipes checked against the registry, and the resumable pipeline that runs them."""
