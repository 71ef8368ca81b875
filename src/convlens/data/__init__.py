"""Images in: image folders and lists, preprocessing and batches, the built-in shapes dataset, concept labels."""
