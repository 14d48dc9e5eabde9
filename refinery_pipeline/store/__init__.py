"""The label store: its schema, creation, reads, integrity, remote access, tools."""
