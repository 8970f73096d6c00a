"""Publish an exported version folder into the model store through the store's own API.

``publish`` runs exactly the checks of ``dicom-node models add`` (valid manifest, sha256 of the
model file, version not yet present, output contract equal to production unless allowed),
because it *is* :meth:`ModelStore.add`. Optionally it points an alias (``candidate``,
``shadow`` ...) at the new version; promotion to production is the operator's step
(``dicom-node models promote``), not training's.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dicom_node.modelstore.store import ModelStore, ResolvedVersion

LOGGER = logging.getLogger(__name__)


def publish(
    model_dir: Path | str,
    models_root: Path | str,
    *,
    alias: str | None = None,
    allow_contract_change: bool = False,
) -> ResolvedVersion:
    """Add ``model_dir`` to the store at ``models_root`` and optionally set ``alias``.

    Parameters
    ----------
    model_dir : path
        Version folder from ``export`` (``model.onnx`` + ``manifest.yaml``).
    models_root : path
        Root of the model store (``models/``); created when missing.
    alias : str, optional
        Alias to point at the new version (for a canary use ``dicom-node models canary``).
    allow_contract_change : bool
        Accept segments that differ from the production version's.

    Returns
    -------
    ResolvedVersion
        The added version (with ``alias`` set when one was given).

    Raises
    ------
    dicom_node.modelstore.store.ModelStoreError
        The store refused the version or the alias (nothing is left half-added).
    """
    root = Path(models_root)
    root.mkdir(parents=True, exist_ok=True)
    store = ModelStore(root)
    added = store.add(model_dir, allow_contract_change=allow_contract_change)
    LOGGER.info("published %s:%s", added.name, added.version)
    if alias:
        store.set_alias(added.name, alias, added.version, reason="publish")
        return store.resolve(f"{added.name}@{alias}")
    return added
