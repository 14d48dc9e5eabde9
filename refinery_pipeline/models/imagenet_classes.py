"""Which outputs of a classifier label a data set's classes, ImageNet-1k's in particular.

A model trained on ImageNet-1k predicts its 1,000 classes in sorted-WordNet-id order: the order
an ImageFolder gives ILSVRC-2012's class folders, which torchvision's and timm's ImageNet weights
follow. Imagenette, Imagewoof and Tiny-ImageNet name their folders by those ids, so such a model
can label them by picking out their classes' outputs. The ids ship with the package
(``imagenet1k_wnids.txt``, copied from timm's ``timm/data/_info/imagenet_synsets.txt``) because
timm is only an optional extra.
"""
from functools import lru_cache
from importlib import resources

NUM_IMAGENET1K_CLASSES = 1000
WNIDS_FILE = "imagenet1k_wnids.txt"


@lru_cache(maxsize=None)
def _imagenet1k_table() -> tuple:
    """``(wnid, lemmas)`` rows of the packaged file, in output order."""
    text = resources.files(__package__).joinpath(WNIDS_FILE).read_text(encoding="utf-8")
    rows = (line.split("\t", 1) for line in text.splitlines()
            if line.strip() and not line.startswith("#"))
    return tuple((row[0].strip(), row[1].strip() if len(row) > 1 else "") for row in rows)


def imagenet1k_wnids() -> tuple:
    """The 1,000 ImageNet-1k WordNet ids (``n01440764``, ...) in the models' output order.

    Returns
    -------
    tuple of str
        Output ``i`` of an ImageNet-1k model is class ``imagenet1k_wnids()[i]``.
    """
    return tuple(wnid for wnid, _ in _imagenet1k_table())


@lru_cache(maxsize=None)
def _first_lemmas() -> dict:
    """WordNet id -> its first lemma, for every ImageNet-1k class that has one."""
    return {wnid: lemmas.split(",")[0].strip() for wnid, lemmas in _imagenet1k_table() if lemmas}


def readable_name(name: str) -> str:
    """A class name for people: an ImageNet-1k WordNet id's first lemma (``n02123394`` ->
    ``Persian cat``), any other name as it is. Plots of ImageNet-subset data (Tiny-ImageNet,
    Imagenette) otherwise title every crop with an id."""
    return _first_lemmas().get(name, name)


def output_indices(classes, outputs) -> list:
    """The output index of each of ``classes`` among a model's named ``outputs``.

    Parameters
    ----------
    classes : sequence of str
        The data set's class names, in its label order.
    outputs : sequence of str
        The class each model output predicts, in output order.

    Returns
    -------
    list of int or None
        ``indices[j]`` is the output that predicts ``classes[j]``; None when any class is not
        among ``outputs`` (then the model cannot label this data set by selection).
    """
    position = {name: i for i, name in enumerate(outputs)}
    if not classes or any(c not in position for c in classes):
        return None
    return [position[c] for c in classes]


def imagenet1k_outputs(classes) -> list:
    """:func:`output_indices` of ``classes`` in an ImageNet-1k model (None unless every class is
    an ImageNet-1k WordNet id)."""
    return output_indices(classes, imagenet1k_wnids())
