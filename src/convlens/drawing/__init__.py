"""Pictures every stage draws: line and bar charts (matplotlib, PNG + SVG), heat maps, titled tiles and grids."""
