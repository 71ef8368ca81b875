"""Attribution: the base of gradient-map visualizers and filters, and the saliency sanity checks (002 sec. 6)."""
