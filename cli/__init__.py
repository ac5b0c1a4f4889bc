"""The `spanner` command line: sits on top of every other package and is imported by none."""
