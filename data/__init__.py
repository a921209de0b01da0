"""Data set tools: build ImageNet lists, validate a data set, make the demo data set."""
