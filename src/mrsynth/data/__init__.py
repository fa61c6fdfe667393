"""Reading volumes, slicing, normalising, and the built-in data set."""
