"""What every stage runs on: devices, seeds, distributed ranks, atomic tensor and JSON files, rank statistics."""
