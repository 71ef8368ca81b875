"""Pictures every stage draws: line and bar charts, heat maps, titled tiles and grids (PIL only)."""
