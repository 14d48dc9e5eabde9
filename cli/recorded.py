"""What an existing store records, as the commands reading it reuse it: the conversion of its
data (so DATA converts to the same .beton) and its refinery (classes, input size, BN mode)."""


def open_store_data(data, store, cache_dir, workers: int = 2):
    """DATA of an existing STORE, a tree converted as the store's labels were made (so to the
    same .beton)."""
    from refinery_pipeline.sources.data_cache import open_dataset
    from refinery_pipeline.sources.dataset import conversion_options
    options = conversion_options(recorded_source(store))
    return open_dataset(data, "train", cache_dir, options, num_workers=workers)


def recorded_source(location):
    """The ``dataset.source`` an existing store records; None for a new store, or one that
    cannot be read (the command's own check of it names the problem)."""
    from refinery_pipeline.core.errors import StoreError
    from refinery_pipeline.store.label_store import LabelStore
    try:
        return LabelStore.open(location).dataset.source
    except (StoreError, TypeError, KeyError):
        return None


def recorded_refinery(store, weights, device, trust_checkpoint):
    """The refinery ``weights`` make under STORE's record of its refinery (its classes,
    input size, BN mode: an ImageNet refinery selects the store's classes)."""
    from refinery_pipeline.core.devices import resolve_device
    from refinery_pipeline.labelling.refinery import load_as_recorded
    from refinery_pipeline.store.label_store import LabelStore
    opened = LabelStore.open(store)
    return load_as_recorded(weights, opened.attrs["refinery"], opened.classes,
                            device=resolve_device(device), trust_checkpoint=trust_checkpoint)
