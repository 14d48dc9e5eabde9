"""What a copy holds of each store row, as `refine check-copy` reports it (one code per row:
``CopyReport.verdicts``), shared by the scan of the copy and the comparison of its labels."""

ABSENT, EXACT, RESIZED, REENCODED, DECODED, REFRAMED, UNREADABLE = range(7)
USABLE_VERDICTS = (EXACT, RESIZED, REENCODED, DECODED)  # rows whose crops can be cut
