"""Units of a layer (channels or SAE latents): their maps, statistics with concept selectivity, ranking."""
