"""demo: the whole loop on one machine (``dicom-node demo``) and the synthetic studies it needs.

Part of the composition root: no stage package imports it. ``phantoms`` is also what the training
package draws its synthetic thyroid studies from (numpy and pydicom only, no torch).
"""
