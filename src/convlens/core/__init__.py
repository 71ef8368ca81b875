"""The plugin kernel: hook specifications, plugin loading, the component registry, parameters, the contracts of each
plugin kind, and errors. It imports nothing else of convlens and no torch at load time."""
