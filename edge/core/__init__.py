"""The small core every stage may import: typed values, the error hierarchy, settings."""
