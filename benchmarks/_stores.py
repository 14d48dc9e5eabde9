"""Shared by the store benchmarks: write the labels of an existing store into a new one, through
the real writer (``LabelStore.create`` + ``write_chunk`` + ``finalize``), as precompute would."""
from pathlib import Path
from typing import Callable

from refinery_pipeline.store.label_store import LabelStore
from refinery_pipeline.store.schema import CropRecords, StoreLayout

# What precompute records besides the layout, the format and the seals (which create() writes).
COPIED_ATTRIBUTES = ("plan", "refinery", "dataset", "batching", "software")


def rewrite_store(source: LabelStore, out: Path, layout: StoreLayout,
                  chunk_records: Callable[[int], CropRecords]) -> LabelStore:
    """A store at ``out`` with ``source``'s attributes, ground truth and image sizes but
    ``layout`` (another top-k, prob_bits, ...), chunk ``c`` holding ``chunk_records(c)``. With
    the same software and a layout precompute would have made, the bytes are precompute's."""
    attrs = {key: source.attrs[key] for key in COPIED_ATTRIBUTES}
    store = LabelStore.create(out, layout, attrs, labels=source.read_labels(),
                              image_sizes=source.read_image_sizes())
    for c in range(layout.num_chunks):
        store.write_chunk(c, chunk_records(c))
    store.finalize()
    return store
