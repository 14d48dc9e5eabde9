"""The ``refine`` command line: thin click commands that build a config and call the library."""
