"""The service's model-store references: what it declares to BentoML and what it loads.

BentoML resolves every ``BentoModel`` a service declares when ``bentoml serve`` starts and
aborts when one is missing, before the service exists. So a model is declared (and packed by
``bentoml build``) only when its kind is served, no export folder replaces it and its tag is in
the local store; everything else is looked up when the slot loads (:func:`stored_model`), where a
missing entry fails that model alone, with the reason in ``/models``, the logs and its 503s.
"""

from __future__ import annotations

import logging

import bentoml

from bbservice.errors import DataError, first_line
from bbservice.service.settings import Settings

log = logging.getLogger("bbservice.service")


def declared_model(kind: str, settings: Settings | None = None) -> bentoml.models.BentoModel | None:
    """The ``BentoModel`` to declare on the service class for ``kind``, or None (not served,
    replaced by an export folder, or not in the store: then the slot reports why at load)."""
    try:
        settings = settings or Settings.from_env()
    except Exception as err:  # the service's __init__ reports configuration errors
        log.debug("settings unreadable while declaring models: %s", first_line(err))
        return None
    if kind not in settings.models or settings.export_folder(kind):
        return None
    ref = bentoml.models.BentoModel(settings.store_tag(kind))
    try:
        stored = ref.stored
    except Exception as err:  # an unreadable store entry: the slot load says why
        log.warning("model store entry %s is unreadable: %s", ref.tag, first_line(err))
        return None
    if stored is None:
        log.warning("model %s is not in the BentoML model store: %s fails alone", ref.tag, kind)
        return None
    return bentoml.models.BentoModel(stored.tag)  # the resolved version, not "latest"


def stored_model(kind: str, settings: Settings):
    """The model-store entry of ``kind`` (``bentoml.Model``); a one-line DataError naming the
    tag and the fix when it is missing or unreadable."""
    tag = settings.store_tag(kind)
    try:
        stored = bentoml.models.BentoModel(tag).stored
    except Exception as err:
        raise DataError(f"model store entry '{tag}' is unreadable: {first_line(err)}") from None
    if stored is None:
        raise DataError(
            f"model '{tag}' is not in the BentoML model store; run "
            f"`bbservice export {kind} CHECKPOINT`, set BBSERVICE_{kind.upper()}_TAG to a tag "
            f"that is there or BBSERVICE_{kind.upper()}_EXPORT to an export folder"
        )
    return stored
